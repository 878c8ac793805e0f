//! What a run states about where it ran: the machine and the code.

use std::process::Command;

use serde_json::{Value, json};

/// The machine and the commit of the code a run measured.
#[derive(Clone, Debug)]
pub struct Machine {
    /// Logical cores available to this process.
    pub cores: usize,
    /// CPU model name as the kernel reports it.
    pub cpu: String,
    /// Total memory, GiB.
    pub memory_gib: f64,
    /// Kernel name and release.
    pub os: String,
    /// The commit of the code, with `-dirty` if the tree has changes.
    pub commit: String,
    /// Whether this is a release build.
    pub release: bool,
}

impl Machine {
    /// Reads the machine and the commit of the working tree.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let os = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("{} {}", std::env::consts::OS, r.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_string());
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_gib,
            os,
            commit: commit(),
            release: !cfg!(debug_assertions),
        }
    }

    /// One line for a table's heading.
    pub fn summary(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB, {}, {} build, commit {}",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.os,
            if self.release { "release" } else { "debug" },
            self.commit
        )
    }

    /// The JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu": self.cpu,
            "memory_gib": self.memory_gib,
            "os": self.os,
            "commit": self.commit,
            "release": self.release,
        })
    }
}

/// `git rev-parse HEAD` of the working tree (`SOMA_COMMIT` overrides), with
/// `-dirty` when `git status` shows changes; `unknown` outside a checkout.
fn commit() -> String {
    if let Ok(commit) = std::env::var("SOMA_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
            _ => head,
        },
        None => "unknown".to_string(),
    }
}
