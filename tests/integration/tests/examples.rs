//! The example configurations document every key of each daemon's configuration, with the
//! default the daemon really uses: a key added without its example line, or a default changed
//! in code but not in the example, fails here.

use std::path::{Path, PathBuf};

use ztna_node::config::field_names;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// `# key = value` lines turned into `key = value`.
fn uncomment(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// Checks one example: every field documented, and the documented defaults are the real ones
/// (the file as shipped and the file with every default uncommented load the same config).
fn check<C: std::fmt::Debug>(
    file: &str,
    fields: &[&str],
    tables: &[&str],
    load: impl Fn(&Path) -> Result<C, String>,
) {
    let text = std::fs::read_to_string(example(file)).expect("example");
    for key in fields.iter().filter(|k| !tables.contains(k)) {
        let documented = text.lines().any(|l| {
            l.trim_start_matches("# ")
                .strip_prefix(key)
                .is_some_and(|rest| rest.starts_with(" ="))
        });
        assert!(documented, "examples/{file} does not document `{key}`");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = dir.path().join(file);
    let all = dir.path().join(format!("all-{file}"));
    std::fs::write(&shipped, &text).expect("write");
    std::fs::write(&all, uncomment(&text)).expect("write");
    let a = format!("{:?}", load(&shipped).expect("the shipped example loads"));
    let b = format!(
        "{:?}",
        load(&all).expect("the example with every default set loads")
    );
    assert_eq!(
        a, b,
        "examples/{file}: a documented default differs from the real one"
    );
}

#[test]
fn examples_document_every_key_with_its_real_default() {
    check(
        "intermediate.toml",
        field_names::<ztna_intermediate::Config>(),
        &["tls", "policy"],
        |p| ztna_intermediate::Config::load(Some(p), vec![]).map_err(|e| e.to_string()),
    );
    check(
        "connector.toml",
        field_names::<ztna_connector::Config>(),
        &["tls", "service"],
        |p| ztna_connector::Config::load(Some(p), vec![]).map_err(|e| e.to_string()),
    );
    check(
        "agent.toml",
        field_names::<ztna_agent::Config>(),
        &["tls", "forward"],
        |p| ztna_agent::Config::load(Some(p), vec![], vec![]).map_err(|e| e.to_string()),
    );
    // The introspection itself sees the fields.
    assert!(field_names::<ztna_intermediate::Config>().contains(&"max_flows_per_connector"));
}
