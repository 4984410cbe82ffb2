//! Progress bars and log lines for long work.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A bar over images with rate and ETA on a terminal; hidden when stderr is not one (logs, CI),
/// where [`log`] lines carry the progress instead.
pub fn images_bar(total: u64, done: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} img  {rate}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} img/s", s.per_sec());
        }),
    );
    bar.set_prefix(what.to_string());
    bar.set_position(done);
    bar.reset_eta();
    bar
}

/// A timestamped log line on stderr (above the bar when one is drawn).
pub fn log(bar: Option<&ProgressBar>, msg: &str) {
    let line = format!("[{}] {msg}", clock());
    match bar {
        Some(b) if !b.is_hidden() => b.println(line),
        _ => eprintln!("{line}"),
    }
}

fn clock() -> String {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let s = START.get_or_init(Instant::now).elapsed().as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}
