use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use time::format_description::well_known::Rfc3339;
use ztna_pki::{Ca, IssueRequest, PkiError, Validity};

/// Creates a ZTNA deployment CA and issues role certificates.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new CA: writes DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        trust_domain: String,
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a role certificate: writes DIR/<name>.pem (leaf + CA) and DIR/<name>.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// agent, connector or intermediate.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Extra DNS SAN (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Extra IP SAN (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate's SPIFFE ID, role, trust domain, validity and issuer (exit 2 if the
    /// file is not a ZTNA certificate).
    Show {
        /// A certificate (PEM) written by `ztna-pki init` or `ztna-pki issue`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a shell completion script to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Man,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init {
            out,
            trust_domain,
            days,
            force,
        } => {
            let validity = Validity::days(days);
            let ca = Ca::generate(&trust_domain, validity).context("generating CA")?;
            let (cert, key) = ca.write(&out, force).context("writing CA")?;
            println!("wrote CA certificate {}", cert.display());
            println!("wrote CA key         {}", key.display());
            println!("trust domain         spiffe://{}", ca.trust_domain());
            println!("expires              {}", fmt_time(validity.not_after));
        }
        Cmd::Issue {
            ca,
            role,
            name,
            out,
            dns,
            ip,
            days,
            force,
        } => {
            let ca_dir = ca;
            let ca = Ca::load(&ca_dir)
                .with_context(|| format!("loading CA from {}", ca_dir.display()))?;
            let req = IssueRequest {
                dns,
                ips: ip,
                validity: Validity::days(days),
                ..IssueRequest::new(&role, &name)
            };
            let issued = ca.issue(&req).context("issuing certificate")?;
            let (cert, key) = issued
                .write(&out, &name, force)
                .context("writing certificate")?;
            println!("wrote certificate {}", cert.display());
            println!("wrote key         {}", key.display());
            println!("SPIFFE ID         {}", issued.spiffe_id);
            println!("expires           {}", fmt_time(issued.not_after));
        }
        Cmd::Show { file } => {
            let pem =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let info = ztna_pki::describe(&pem).map_err(|e| match e {
                PkiError::NotOurs(why) => anyhow::Error::new(NotOurs(format!(
                    "{}: not a ZTNA certificate: {why}",
                    file.display()
                ))),
                other => anyhow::Error::new(other),
            })?;
            show(&info);
        }
        Cmd::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ztna-pki", &mut std::io::stdout());
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
        }
    }
    Ok(())
}

/// A file that is not one of ours: exit code 2.
#[derive(Debug)]
struct NotOurs(String);
impl std::fmt::Display for NotOurs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotOurs {}

fn show(info: &ztna_pki::CertInfo) {
    let now = time::OffsetDateTime::now_utc();
    let state = if now < info.not_before {
        "NOT YET VALID".to_string()
    } else if now > info.not_after {
        format!("EXPIRED {} days ago", (now - info.not_after).whole_days())
    } else {
        format!("valid, {} days left", (info.not_after - now).whole_days())
    };
    println!("SPIFFE ID     {}", info.spiffe_id);
    match (&info.role, &info.name) {
        (Some(role), Some(name)) => {
            println!("role          {role}");
            println!("name          {name}");
        }
        _ => println!("role          deployment CA"),
    }
    println!("trust domain  {}", info.trust_domain);
    println!("not before    {}", fmt_time(info.not_before));
    println!("not after     {}", fmt_time(info.not_after));
    println!("status        {state}");
    println!("subject       {}", info.subject);
    println!("issuer        {}", info.issuer);
    println!("serial        {}", info.serial);
    if !info.dns.is_empty() {
        println!("DNS names     {}", info.dns.join(", "));
    }
    if !info.ips.is_empty() {
        println!("IP addresses  {}", info.ips.join(", "));
    }
    println!("in file       {} certificate(s)", info.chain_len);
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-pki: {e:#}");
            if e.downcast_ref::<NotOurs>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
