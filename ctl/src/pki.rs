//! `bmctl fleet pki init|issue|revoke`.

use std::net::IpAddr;
use std::path::PathBuf;

use bmfleet_proto::identity::Role;
use bmfleet_proto::pki::{
    init_dir, issue_into_dir, revoke_in_dir, IssueRequest, DEFAULT_VALIDITY_DAYS,
};
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
    /// Revoke NAME's certificate: adds it to DIR/crl.pem, which the orchestrator and every
    /// agent read at start and on SIGHUP (copy it to their tls.crl, then `systemctl reload`).
    Revoke {
        /// The PKI directory.
        #[arg(long, env = "BMFLEET_PKI_DIR")]
        dir: PathBuf,
        /// The holder whose certificate (DIR/NAME.pem) is revoked.
        #[arg(long)]
        name: String,
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
        PkiCommand::Revoke { dir, name } => {
            let (crl, count) = revoke_in_dir(&dir, &name)?;
            println!(
                "revoked {name}: {} now lists {count} certificate(s); copy it to every host's \
                 tls.crl and send SIGHUP (systemctl reload) to the orchestrator and the agents",
                crl.display()
            );
        }
    }
    Ok(())
}
