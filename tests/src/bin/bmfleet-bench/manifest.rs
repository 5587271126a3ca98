//! The manifest's memory: an agent hashing a big file (an Elasticsearch segment, an HSM
//! archive) for the final-pass gate must stay small. Hashes an N GiB file with the agent's
//! manifest (a block at a time) and reports the process's peak resident memory, then reads it
//! whole as the manifest did before, for comparison.

use std::path::Path;
use std::time::Instant;

use sha2::Digest;

/// The process's peak resident memory (VmHWM), bytes.
fn peak_rss() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))?;
    Ok(kib * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Hashes a `gib` GiB file three times with the manifest, then once whole, and prints both
/// peaks and times.
pub fn run(gib: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("segment");
    {
        // Data every 64 MiB, holes between: reading it costs what reading data costs.
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&path)?;
        file.set_len(gib << 30)?;
        let block = vec![0x5au8; 1 << 20];
        let mut at = 0;
        while at < gib << 30 {
            file.write_at(&block, at)?;
            at += 64 << 20;
        }
    }
    let before = peak_rss()?;
    let mut times = Vec::new();
    let mut streamed = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        streamed = bmfleet_agent::files::manifest::content_digest(Path::new(&path))
            .map_err(anyhow::Error::msg)?;
        times.push(started.elapsed().as_secs_f64());
    }
    let streaming_peak = peak_rss()?;
    times.sort_by(f64::total_cmp);
    let started = Instant::now();
    let whole = std::fs::read(&path)?;
    let digest = sha2::Sha256::digest(&whole).to_vec();
    let whole_secs = started.elapsed().as_secs_f64();
    drop(whole);
    let whole_peak = peak_rss()?;
    anyhow::ensure!(digest == streamed, "the two digests differ");
    println!("| hashing a {gib} GiB file | peak resident memory | time |");
    println!("| --- | --- | --- |");
    println!("| process before hashing | {:.1} MiB | |", mib(before));
    println!(
        "| manifest (a block at a time), median of 3 | {:.1} MiB | {:.2} s |",
        mib(streaming_peak),
        times[1]
    );
    println!(
        "| whole file read (the manifest before) | {:.1} MiB | {:.2} s |",
        mib(whole_peak),
        whole_secs
    );
    println!(
        "{}",
        serde_json::json!({
            "gib": gib,
            "rss_before_bytes": before,
            "rss_streaming_bytes": streaming_peak,
            "rss_whole_file_bytes": whole_peak,
            "streaming_secs_median": times[1],
            "whole_file_secs": whole_secs,
        })
    );
    Ok(())
}
