//! `bmctl fleet pki init|issue`.

use std::net::IpAddr;
use std::path::PathBuf;

use bmfleet_proto::identity::Role;
use bmfleet_proto::pki::{init_dir, issue_into_dir, IssueRequest, DEFAULT_VALIDITY_DAYS};
use clap::Subcommand;

/// PKI subcommands.
#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make the fleet CA in DIR (refuses to replace an existing one).
    Init {
        /// The PKI directory.
        #[arg(long, env = "BMFLEET_PKI_DIR")]
        dir: PathBuf,
    },
    /// Issue a certificate and key signed by the fleet CA of DIR (NAME.pem, NAME-key.pem).
    Issue {
        /// The PKI directory.
        #[arg(long, env = "BMFLEET_PKI_DIR")]
        dir: PathBuf,
        /// The holder's fleet name (also its first DNS name).
        #[arg(long)]
        name: String,
        /// What the holder may do.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Extra DNS names.
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: bmfleet_proto::identity::UnknownRole| e.to_string())
}

/// Runs a PKI subcommand.
pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir } => {
            let ca = init_dir(&dir)?;
            println!("fleet CA written: {}", ca.display());
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            dns,
            ip,
            days,
        } => {
            let mut req = IssueRequest::new(&name, role, days);
            req.dns = dns;
            req.ips = ip;
            let files = issue_into_dir(&dir, &req)?;
            println!(
                "issued {name} (role {role}, {days} days): {} and {} (mode 0600)",
                files.cert.display(),
                files.key.display()
            );
        }
    }
    Ok(())
}
