//! The network lab: hosts are network namespaces on a bridge that lives in a namespace of its
//! own ("the switch"), addressed from 198.18.0.0/24 (the benchmarking range, 198.18.0.0/15).
//! Nothing is added to the root namespace. Every process started in the lab is killed and
//! every namespace (with its links) deleted when the lab is dropped, also on a failed test.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use crate::ChildGuard;

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct LabHost {
    /// Its short name in the lab.
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on its card.
    pub ip: Ipv4Addr,
    /// Its card's name (`eth0` unless renamed: hosts of a newer distribution name theirs
    /// otherwise).
    pub card: String,
}

/// A lab of hosts on one bridge.
pub struct Lab {
    switch: String,
    hosts: Vec<LabHost>,
    processes: Mutex<Vec<ChildGuard>>,
}

/// The switch's own address (so its neighbour table shows who holds which IP).
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Lab {
    /// Creates the switch and one namespace per host name, host n at 198.18.0.(n+1)/24.
    pub fn new(names: &[&str]) -> Lab {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "bmf{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let switch = format!("{tag}-sw");
        let mut lab = Lab {
            switch: switch.clone(),
            hosts: Vec::new(),
            processes: Mutex::new(Vec::new()),
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "set", "lo", "up"]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        ip(&[
            "-n",
            &switch,
            "addr",
            "add",
            &format!("{SWITCH_IP}/24"),
            "dev",
            "br0",
        ]);
        for (n, name) in names.iter().enumerate() {
            let ns = format!("{tag}-{name}");
            ip(&["netns", "add", &ns]);
            lab.hosts.push(LabHost {
                name: name.to_string(),
                ns: ns.clone(),
                ip: Ipv4Addr::new(198, 18, 0, n as u8 + 1),
                card: "eth0".into(),
            });
            let port = format!("p{n}");
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.18.0.{}/24", n + 1),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lab
    }

    /// Renames `host`'s card (down, renamed, up: its address stays), as a newer
    /// distribution names it (`ens18`).
    pub fn rename_card(&mut self, host: &str, card: &str) {
        let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) else {
            return;
        };
        let ns = h.ns.clone();
        ip(&["-n", &ns, "link", "set", &h.card, "down"]);
        ip(&["-n", &ns, "link", "set", &h.card, "name", card]);
        ip(&["-n", &ns, "link", "set", card, "up"]);
        h.card = card.to_string();
    }

    /// `host`'s card's name.
    pub fn card(&self, host: &str) -> String {
        self.hosts
            .iter()
            .find(|h| h.name == host)
            .map_or_else(|| "eth0".to_string(), |h| h.card.clone())
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> &LabHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"))
    }

    /// The namespace of `host` (`"switch"` for the switch).
    fn ns(&self, host: &str) -> String {
        if host == "switch" {
            self.switch.clone()
        } else {
            self.host(host).ns.clone()
        }
    }

    /// A command running `program` inside `host`'s namespace (`"switch"` for the switch).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = self.ns(host);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns]).arg(program);
        cmd
    }

    /// The MACs that answer an ARP request for `addr` from the switch (three requests, 200 ms
    /// apart): the hosts that would get its traffic.
    pub fn arp_answers(&self, addr: &str) -> std::collections::BTreeSet<String> {
        let out = self
            .command("switch", "arping")
            .args(["-c", "3", "-W", "0.2", "-i", "br0", addr])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // "60 bytes from 02:…:ff (198.18.0.101): index=0 time=…"
        text.lines()
            .filter_map(|l| l.split(" bytes from ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The switch's neighbour table: address → MAC, for entries that have one.
    pub fn switch_neighbours(&self) -> std::collections::BTreeMap<String, String> {
        let out = self.ip("switch", &["neigh", "show", "dev", "br0"]);
        out.lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let addr = words.next()?;
                let mac = words.skip_while(|w| *w != "lladdr").nth(1)?;
                Some((addr.to_string(), mac.to_string()))
            })
            .collect()
    }

    /// Starts a long-running process in the lab; it is killed with the lab.
    pub fn spawn(&self, mut command: Command) {
        let child = ChildGuard::spawn(&mut command);
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child);
    }

    /// `ip ARGS` inside `host` (`"switch"` for the switch).
    pub fn ip(&self, host: &str, args: &[&str]) -> String {
        let ns = self.ns(host);
        let mut full = vec!["-n", &ns];
        full.extend_from_slice(args);
        String::from_utf8_lossy(&ip(&full).stdout).into_owned()
    }

    /// Slows `host`'s link both ways to `rate` (tc's `tbf`, e.g. "2mbit"), or with `None` gives
    /// it its full speed back. A delay would need `netem`, which this kernel lacks.
    pub fn shape(&self, host: &str, rate: Option<&str>) {
        let index = self.hosts.iter().position(|h| h.name == host);
        let Some(index) = index else { return };
        let port = format!("p{index}");
        for (ns, dev) in [
            (&self.hosts[index].ns, self.hosts[index].card.as_str()),
            (&self.switch, port.as_str()),
        ] {
            let mut tc = Command::new("ip");
            tc.args(["netns", "exec", ns, "tc", "qdisc"]);
            match rate {
                Some(rate) => tc.args([
                    "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                    "latency", "400ms",
                ]),
                None => tc.args(["del", "dev", dev, "root"]),
            };
            let _ = tc.output();
        }
    }

    /// The MAC address of `host`'s card.
    pub fn mac(&self, host: &str) -> String {
        let out = self.ip(host, &["-o", "link", "show", &self.card(host)]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// The MAC the switch's neighbour table holds for `addr`, if any.
    pub fn switch_neighbour(&self, addr: &str) -> Option<String> {
        self.switch_neighbours().remove(addr)
    }

    /// Runs `f` on a thread inside `host`'s network namespace (`"switch"` for the switch):
    /// sockets it opens belong to that namespace.
    pub fn run_in<R: Send>(&self, host: &str, f: impl FnOnce() -> R + Send) -> R {
        let ns = self.ns(host);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = std::fs::File::open(Path::new("/var/run/netns").join(&ns))
                        .expect("netns file");
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("lab thread")
        })
    }
}

impl Lab {
    /// Kills every process running in the lab's namespaces (daemons that services started
    /// included).
    pub fn kill_all(&self) {
        self.processes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for ns in self.hosts.iter().map(|h| &h.ns).chain([&self.switch]) {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }

    /// Kills (SIGKILL) the processes of `host` whose command line contains `needle`, and
    /// waits until they are gone.
    pub fn kill_matching(&self, host: &str, needle: &str) {
        self.signal_matching(host, needle, nix::sys::signal::Signal::SIGKILL);
    }

    /// Sends `signal` to the processes of `host` whose command line contains `needle`, and
    /// waits (up to 30 s) until they are gone, every thread of theirs.
    pub fn signal_matching(&self, host: &str, needle: &str, signal: nix::sys::signal::Signal) {
        let ns = self.host(host).ns.clone();
        let out = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .expect("ip netns pids");
        let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
            })
            .collect();
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
        }
        for pid in pids {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !gone(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// The hosts, in creation order.
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }
}

/// Whether process `pid` is gone with all its threads: a killed process's main thread turns
/// zombie before its other threads have exited, and its sockets stay open until the last one
/// has (a restart binding the same port in between fails).
fn gone(pid: i32) -> bool {
    let zombie = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.contains(") Z "),
        Err(_) => return true,
    };
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    zombie && threads <= 1
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_all();
        for ns in self
            .hosts
            .iter()
            .map(|h| h.ns.clone())
            .chain([self.switch.clone()])
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}
