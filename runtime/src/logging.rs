//! runc-style logging: `--log FILE` (stderr when absent), `--log-format text|json`, `--debug`.
//!
//! containerd's runc shim passes `--log <bundle>/log.json --log-format json` and, when a command
//! fails, reads the last `{"level":"error","msg":...}` line to build its error; it matches
//! phrases in `msg` ("container not running", "does not exist"), so errors are logged exactly as
//! they are printed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use clap::ValueEnum;
use serde_json::json;

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    format: LogFormat,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(self.format, record.level(), &record.args().to_string());
        if let Ok(mut out) = self.out.lock() {
            // One write per line so that lines from concurrent husk processes do not interleave.
            let _ = out.write_all(line.as_bytes());
        }
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

/// runc's level names (logrus): "error", "warning", "info", "debug".
fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warning",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

fn format_line(format: LogFormat, level: log::Level, msg: &str) -> String {
    let time = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    match format {
        LogFormat::Json => {
            let mut line =
                json!({"level": level_name(level), "msg": msg, "time": time}).to_string();
            line.push('\n');
            line
        }
        LogFormat::Text => {
            format!("time=\"{time}\" level={} msg={:?}\n", level_name(level), msg)
        }
    }
}

/// Install the logger: to `path` (appended) or stderr; `level` from `--debug` or the config.
pub fn init(
    path: Option<&Path>,
    format: LogFormat,
    level: log::LevelFilter,
) -> std::io::Result<()> {
    let out: Box<dyn Write + Send> = match path {
        Some(path) => Box::new(open_log(path)?),
        None => Box::new(std::io::stderr()),
    };
    let logger = Logger { out: Mutex::new(out), format };
    // Only fails when a logger is already installed, which main does once.
    let _ = log::set_boxed_logger(Box::new(logger));
    log::set_max_level(level);
    Ok(())
}

fn open_log(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_what_containerd_parses() {
        let line =
            format_line(LogFormat::Json, log::Level::Error, "container \"x\" does not exist");
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "container \"x\" does not exist");
        assert!(humantime::parse_rfc3339(v["time"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn text_lines_quote_the_message() {
        let line = format_line(LogFormat::Text, log::Level::Warn, "a \"b\"");
        assert!(line.contains("level=warning msg=\"a \\\"b\\\"\""), "{line}");
    }
}
