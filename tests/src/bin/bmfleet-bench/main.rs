//! bmfleet's benchmarks (not part of CI; BENCHMARKS.md has the commands and the results).
//!
//! - `bmfleet-bench orchestrator [--pairs N]`: one orchestrator, N simulated pairs.
//! - `bmfleet-bench downtime [--files N] [--message-sizes small|realistic] [--db-rows N] [--churn F] [--db-churn clustered|scattered] [--cold-cache]`: the
//!   manual procedure vs bmfleet (databases following the origin, and dumped) on identical
//!   lab instances, with the physical floor and the tunnel's throughput against rsync over ssh.
//! - `bmfleet-bench summarize FILE…`: medians, ratios and growths of saved `downtime` runs.
//! - `bmfleet-bench manifest [--gib N]`: the agent's peak memory hashing an N GiB file.

mod downtime;
mod manifest;
mod manual;
mod orchestrator;
mod summarize;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// One orchestrator, N simulated instance pairs, every phase.
    Orchestrator {
        /// Instance pairs.
        #[arg(long, default_value_t = 1000)]
        pairs: usize,
        /// Instances down at once.
        #[arg(long, default_value_t = 20)]
        max_down: u32,
    },
    /// The manual procedure vs bmfleet's cold sync and cutover on the same instance (run as
    /// root: it builds the network lab).
    Downtime {
        /// Messages in each origin's cyrus spool (every seventh also hard-linked).
        #[arg(long, default_value_t = 200_000)]
        files: usize,
        /// How big the messages are: `small` (0.2–1.1 KB, BENCHMARKS.md's instance) or
        /// `realistic` (about 15 KB on average, 2 % of them 40–400 KB: a 3 GB spool for
        /// 200,000 messages).
        #[arg(long, value_enum, default_value = "small")]
        message_sizes: bmfleet_tests::lab_fleet::MessageSizes,
        /// Rows of each of the two biggest tables (bj and bj-data); 1,200,000 rows make
        /// about 250 MB of databases.
        #[arg(long, default_value_t = 1_200_000)]
        db_rows: u64,
        /// Fraction of the messages (and database rows) that change between the hot sync
        /// and the cold sync.
        #[arg(long, default_value_t = 0.01)]
        churn: f64,
        /// Drop the page cache right before each cold sync.
        #[arg(long)]
        cold_cache: bool,
        /// bmfleet's database paths to measure, comma-separated, each on its own pair.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "stream,dump,logical"
        )]
        paths: Vec<downtime::DbPath>,
        /// The logical path's target runs PostgreSQL 16 (pgserver's, as `deploy/setup.sh`
        /// installs it for the tests) against the origin's 15: a move across majors.
        #[arg(long)]
        subscriber_pg16: bool,
        /// Where the day's database changes land: `clustered` (the first rows updated, the
        /// last deleted) or `scattered` (every n-th row of every table, as BlueMind's flag
        /// and folder updates are).
        #[arg(long, value_enum, default_value = "clustered")]
        db_churn: bmfleet_tests::lab_fleet::DbChurn,
        /// When the day's changes land on bmfleet's origins: `last-second` (right after the
        /// pre-window pass: the cold sync faces all of them, as the manual procedure's does),
        /// `live` (right before it, while the service runs) or `during` (while it runs: its
        /// later rounds carry what landed meanwhile).
        #[arg(long, value_enum, default_value = "last-second")]
        day_lands: downtime::DayLands,
    },
    /// Medians of saved `downtime` runs (one run's output per file), as ratios per run, and
    /// each downtime's growth with the day's changes.
    Summarize {
        /// Files holding one `downtime` run's output each.
        files: Vec<std::path::PathBuf>,
    },
    /// Peak memory of the manifest hashing one big file (and of reading it whole).
    Manifest {
        /// The file's size, GiB.
        #[arg(long, default_value_t = 4)]
        gib: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Bench::Orchestrator { pairs, max_down } => orchestrator::run(pairs, max_down),
        Bench::Manifest { gib } => manifest::run(gib),
        Bench::Summarize { files } => summarize::run(&files),
        Bench::Downtime {
            files,
            message_sizes,
            db_rows,
            churn,
            cold_cache,
            paths,
            subscriber_pg16,
            db_churn,
            day_lands,
        } => downtime::run(downtime::Params {
            files,
            message_sizes,
            db_rows,
            churn,
            cold_cache,
            paths,
            subscriber_pg16,
            db_churn,
            day_lands,
        }),
    }
}
