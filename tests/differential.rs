//! The randomized differential tester (see `support::differential`): seeds make schemas,
//! maps and concurrent transactions; each target must equal its oracle.
//!
//! `KVSZ_DIFF_SEED=<seed>` reruns one case, `KVSZ_DIFF_SECONDS=<n>` (with
//! `KVSZ_DIFF_FROM=<first seed>`) explores new seeds for that long, known-open features
//! included unless `KVSZ_DIFF_ALL=0`; `KVSZ_DIFF_ALL=1` turns them on elsewhere.
//!
//! A failing seed is shrunk: its sessions are dropped or cut to shorter prefixes of
//! their transactions while it still fails, and the smallest failing workload is
//! reported with its own rerun command (`KVSZ_DIFF_KEEP=<transactions per session>`).
//! `KVSZ_DIFF_SHRINK=0` turns that off.

mod support;

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::differential::{rerun_command, run_case, Features, Keep, Outcome};

/// Seeds CI runs, known-open features off: about 3 minutes in --release on two cores
/// (90 cases of 1-7 s, plus starting the seven source clusters).
const FIXED_SEEDS: std::ops::RangeInclusive<u64> = 1..=90;

/// Seeds found failing by exploration, kept as regression tests: 400054 (history,
/// citext with a filter: a key deleted and inserted again in another spelling, in the
/// batch that opened its version, started at 1900); 500057 (history, citext, two sids:
/// one tenant's DELETE of 'key1' closed the other's version of 'KEY1' in one batch;
/// 500128 the same through a TRUNCATE and a reinsert in another spelling); 500161 (a
/// refused partial UPDATE that a later whole row of its key superseded in the batch);
/// 500255 (append, citext, filter: a respelling the filter left out, then a partial
/// UPDATE, kept the old spelling).
const FOUND_SEEDS: &[u64] = &[400054, 500057, 500128, 500161, 500255];

/// The seed `differential_seed` runs without any variable, so it never passes idle.
const DEFAULT_SEED: u64 = 1;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer")),
    )
}

/// `KVSZ_DIFF_ALL` as a switch; `default` when unset.
fn all_features(default: bool) -> bool {
    match std::env::var("KVSZ_DIFF_ALL").as_deref().map(str::trim) {
        Ok("1") | Ok("true") | Ok("yes") => true,
        Ok("0") | Ok("false") | Ok("no") => false,
        _ => default,
    }
}

/// Runs of a failing seed the shrinker may spend.
const SHRINK_RUNS: usize = 16;

/// Runs one seed; a panic inside (a cluster or the daemon not starting) becomes a
/// failure that still names the seed.
fn run(seed: u64, features: Features, keep: &Keep) -> Outcome {
    let started = Instant::now();
    match panic::catch_unwind(AssertUnwindSafe(|| run_case(seed, features, keep))) {
        Ok(outcome) => outcome,
        Err(e) => {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Outcome {
                seed,
                version: 0,
                committed: 0,
                given_up: 0,
                elapsed: started.elapsed(),
                description: String::new(),
                first_given_up: None,
                failure: Some(format!(
                    "DIFFERENTIAL FAILURE: seed {seed} panicked: {why}\nrerun: {}",
                    rerun_command(seed, features.all, keep)
                )),
                sessions: Vec::new(),
            }
        }
    }
}

fn print(o: &Outcome) {
    eprintln!(
        "seed {}: {}; {} transactions committed, {} given up, {:.1} s: {}",
        o.seed,
        o.description,
        o.committed,
        o.given_up,
        o.elapsed.as_secs_f64(),
        if o.failure.is_some() { "FAILED" } else { "ok" }
    );
    if let Some(why) = &o.first_given_up {
        eprintln!("  (a transaction given up: {why})");
    }
}

/// The smallest workload of failing `seed` that still fails, found greedily within
/// [`SHRINK_RUNS`] runs: each session dropped, then each cut to half its transactions,
/// for as long as that still fails. None when no smaller workload failed (the failure
/// may need the whole interleaving).
fn shrink(seed: u64, features: Features, sessions: &[usize]) -> Option<(Keep, String)> {
    let mut keep = sessions.to_vec();
    let mut best = None;
    let mut runs = 0;
    let attempt = |k: &[usize], runs: &mut usize| -> Option<String> {
        *runs += 1;
        let o = run(seed, features, &Keep(k.to_vec()));
        eprintln!(
            "  shrink {seed}: transactions per session {k:?}: {}",
            if o.failure.is_some() {
                "still fails"
            } else {
                "passes"
            }
        );
        o.failure
    };
    let candidates = |keep: &[usize]| -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for i in 0..keep.len() {
            if keep[i] > 0 && keep.iter().filter(|&&n| n > 0).count() > 1 {
                let mut k = keep.to_vec();
                k[i] = 0;
                out.push(k);
            }
        }
        for i in 0..keep.len() {
            if keep[i] > 1 {
                let mut k = keep.to_vec();
                k[i] /= 2;
                out.push(k);
            }
        }
        out
    };
    'outer: while runs < SHRINK_RUNS {
        for k in candidates(&keep) {
            if runs >= SHRINK_RUNS {
                break 'outer;
            }
            if let Some(report) = attempt(&k, &mut runs) {
                keep = k;
                best = Some(report);
                continue 'outer;
            }
        }
        break;
    }
    best.map(|report| (Keep(keep), report))
}

fn shrinking() -> bool {
    !matches!(
        std::env::var("KVSZ_DIFF_SHRINK").as_deref().map(str::trim),
        Ok("0") | Ok("false") | Ok("no")
    )
}

/// Runs `seeds` (or seeds from the first for `budget`), prints each and a summary, and
/// fails with every failure's report.
fn run_all(seeds: impl Iterator<Item = u64>, budget: Option<Duration>, features: Features) {
    let keep = Keep::from_env();
    let started = Instant::now();
    let (mut n, mut txns, mut failures) = (0, 0, Vec::new());
    for seed in seeds {
        if budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        let o = run(seed, features, &keep);
        print(&o);
        n += 1;
        txns += o.committed;
        if let Some(f) = o.failure {
            eprintln!("{f}");
            if shrinking() && keep.0.is_empty() {
                if let Some((k, report)) = shrink(seed, features, &o.sessions) {
                    eprintln!(
                        "SHRUNK seed {seed} to transactions per session {k} (of {:?}):\n{report}",
                        o.sessions
                    );
                }
            }
            failures.push((seed, f));
        }
    }
    let failed: Vec<u64> = failures.iter().map(|f| f.0).collect();
    eprintln!(
        "differential: {n} seeds, {txns} transactions committed, {} failures {failed:?}, \
         {:.0} s, known-open features {}",
        failures.len(),
        started.elapsed().as_secs_f64(),
        if features.all { "on" } else { "off" }
    );
    // Each report was printed above as its seed failed.
    assert!(
        failures.is_empty(),
        "{} of {n} seeds diverged: {failed:?} (reports above); rerun one with\n{}",
        failures.len(),
        rerun_command(
            failed.first().copied().unwrap_or_default(),
            features.all,
            &keep
        )
    );
}

/// The fixed seeds, known-open features off: what CI keeps green.
#[test]
fn differential_fixed_seeds() {
    run_all(
        FIXED_SEEDS.chain(FOUND_SEEDS.iter().copied()),
        None,
        Features {
            all: all_features(false),
        },
    );
}

/// `KVSZ_DIFF_SEED`: that seed (or comma-separated seeds); `KVSZ_DIFF_SECONDS`: new seeds from `KVSZ_DIFF_FROM`
/// (default: the clock) for that long, every feature on; neither: [`DEFAULT_SEED`].
#[test]
fn differential_seed() {
    if let Ok(list) = std::env::var("KVSZ_DIFF_SEED") {
        let seeds: Vec<u64> = list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("KVSZ_DIFF_SEED={list:?}: {s:?} is not a seed"))
            })
            .collect();
        run_all(
            seeds.into_iter(),
            None,
            Features {
                all: all_features(false),
            },
        );
    } else if let Some(secs) = env_u64("KVSZ_DIFF_SECONDS") {
        let from = env_u64("KVSZ_DIFF_FROM").unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            now.as_secs() % 1_000_000 * 1000
        });
        eprintln!("differential: seeds from {from} for {secs} s");
        run_all(
            from..,
            Some(Duration::from_secs(secs)),
            Features {
                all: all_features(true),
            },
        );
    } else {
        run_all(
            std::iter::once(DEFAULT_SEED),
            None,
            Features {
                all: all_features(false),
            },
        );
    }
}
