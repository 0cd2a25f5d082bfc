use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use time::format_description::well_known::Rfc3339;
use ztna_pki::{Ca, IssueRequest, Validity};

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
    }
    Ok(())
}

fn fmt_time(t: time::OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-pki: {e:#}");
            ExitCode::FAILURE
        }
    }
}
