//! Real sshd in lab hosts: a throwaway host key and root key, an ssh_config that uses them
//! (no agent, no prompt, no known_hosts written outside the lab's directory), one sshd per
//! host listening on the host's lab address. The lab's teardown kills the daemons.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::lab::Lab;

/// sshd's privilege-separation directory.
const PRIVSEP_DIR: &str = "/run/sshd";

/// Keys and configuration for ssh into lab hosts as root.
pub struct SshAccess {
    dir: PathBuf,
    /// `ssh -F` file: the root key, the lab's known_hosts.
    pub ssh_config: PathBuf,
}

fn check(what: &str, cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl SshAccess {
    /// Makes the keys and configuration files in `dir`.
    pub fn new(dir: &Path) -> Result<SshAccess, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for key in ["host_key", "root_key"] {
            let _ = std::fs::remove_file(dir.join(key));
            let _ = std::fs::remove_file(dir.join(format!("{key}.pub")));
            check(
                "ssh-keygen",
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(dir.join(key)),
            )?;
        }
        std::fs::copy(dir.join("root_key.pub"), dir.join("authorized_keys"))
            .map_err(|e| e.to_string())?;
        // The host key is known in advance: strict checking, as an operator's ssh does.
        let host_pub =
            std::fs::read_to_string(dir.join("host_key.pub")).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("known_hosts"), format!("* {host_pub}"))
            .map_err(|e| e.to_string())?;
        let ssh_config = dir.join("ssh_config");
        std::fs::write(
            &ssh_config,
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n",
                dir.join("root_key").display(),
                dir.join("known_hosts").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        // openssh-server's own directory (its package makes it at boot): made if missing,
        // left in place (other sshd may use it).
        std::fs::create_dir_all(PRIVSEP_DIR).map_err(|e| e.to_string())?;
        Ok(SshAccess {
            dir: dir.to_path_buf(),
            ssh_config,
        })
    }

    /// Starts sshd in `host`, root logging in with the key only, and waits until it listens
    /// (checked from `from`).
    pub fn start(&self, lab: &Lab, host: &str, from: &str) -> Result<(), String> {
        let ip = lab.host(host).ip.to_string();
        let config = self.dir.join(format!("sshd_config-{host}"));
        std::fs::write(
            &config,
            format!(
                "ListenAddress {ip}\nHostKey {host_key}\nAuthorizedKeysFile {keys}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 MaxSessions 32\nSubsystem sftp internal-sftp\n",
                host_key = self.dir.join("host_key").display(),
                keys = self.dir.join("authorized_keys").display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(self.dir.join(format!("sshd-{host}.log")))
            .map_err(|e| e.to_string())?;
        let mut sshd = lab.command(host, "/usr/sbin/sshd");
        sshd.arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log);
        lab.spawn(sshd);
        let address = format!("{ip}:22");
        let up = lab.run_in(from, || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(a) = address.parse() {
                    if std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok()
                    {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        });
        if !up {
            return Err(format!(
                "sshd did not come up on {host} (see {})",
                self.dir.display()
            ));
        }
        Ok(())
    }
}
