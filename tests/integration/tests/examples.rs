//! The example configurations document every key of each daemon's configuration, with the
//! default the daemon really uses: a key added without its example line, or a default changed
//! in code but not in the example, fails here. A key whose default is derived from another
//! key's value (the intermediate's `keepalive`) is checked against the value the daemon derives.

use std::path::{Path, PathBuf};

use ztna_node::config::field_names;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// `# key = value` lines turned into `key = value`, except for the keys in `derived`.
fn uncomment(text: &str, derived: &[&str]) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty()
                        && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        && !derived.contains(&k)
                }) =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// The value documented for `key` in an example (`# key = "value"`), without its quotes.
fn documented_value(file: &str, key: &str) -> String {
    let text = std::fs::read_to_string(example(file)).expect("example");
    let prefix = format!("# {key} = ");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("examples/{file} does not document `{key}`"));
    line.trim().trim_matches('"').to_string()
}

/// Checks one example: every field documented, and the documented defaults are the real ones
/// (the file as shipped and the file with every default uncommented load the same config).
fn check<C: std::fmt::Debug>(
    file: &str,
    fields: &[&str],
    tables: &[&str],
    derived: &[&str],
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
    std::fs::write(&all, uncomment(&text, derived)).expect("write");
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
        &["keepalive"],
        |p| ztna_intermediate::Config::load(Some(p), vec![]).map_err(|e| e.to_string()),
    );
    check(
        "connector.toml",
        field_names::<ztna_connector::Config>(),
        &["tls", "service"],
        &[],
        |p| ztna_connector::Config::load(Some(p), vec![]).map_err(|e| e.to_string()),
    );
    check(
        "agent.toml",
        field_names::<ztna_agent::Config>(),
        &["tls", "forward"],
        &[],
        |p| ztna_agent::Config::load(Some(p), vec![], vec![]).map_err(|e| e.to_string()),
    );
    // The intermediate's keepalive defaults to a fraction of idle_timeout: the example shows
    // what the shipped idle_timeout gives.
    let shipped =
        ztna_intermediate::Config::load(Some(&example("intermediate.toml")), vec![]).unwrap();
    assert_eq!(shipped.keepalive, None, "keepalive is unset by default");
    assert_eq!(
        ztna_node::config::parse_duration(&documented_value("intermediate.toml", "keepalive")),
        Ok(shipped.keepalive()),
        "examples/intermediate.toml: the documented keepalive is not the derived one"
    );
    // The introspection itself sees the fields.
    assert!(field_names::<ztna_intermediate::Config>().contains(&"max_flows_per_connector"));
}
