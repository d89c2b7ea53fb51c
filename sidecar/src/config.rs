//! Command line and config file loading.

use std::path::{Path, PathBuf};
use std::time::Duration;
use weir_crds::proxy::{CONFIG_KEY, CONFIG_MOUNT_PATH, ConfigError, ProxyConfig};

pub const USAGE: &str = "\
usage: weir-proxy [--config PATH] [--workers N] [--reload-interval-ms MS] [--no-access-log]

  --config PATH            config file (env WEIR_PROXY_CONFIG; default /etc/weir/proxy.json)
  --workers N              runtime worker threads; 1 (default) runs a single-threaded runtime
                           (env WEIR_PROXY_WORKERS)
  --reload-interval-ms MS  how often the config file is checked for changes (default 2000)
  --no-access-log          no per-request JSON log line (env WEIR_PROXY_ACCESS_LOG=off)
  --otlp-flush-ms MS       longest time a finished span waits before export (default 1000)
  --version, --help

Logs are JSON lines on stdout; the level comes from WEIR_LOG (error, warn, info, debug, trace).
Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a bad command line or an invalid
config (the message names the field), 1 when a listener cannot be bound.";

#[derive(Clone, Debug, PartialEq)]
pub struct Cli {
    pub config_path: PathBuf,
    pub workers: usize,
    pub reload_interval: Duration,
    pub access_log: bool,
    pub otlp_flush_interval: Duration,
}

pub enum CliAction {
    Run(Cli),
    Help,
    Version,
}

pub fn default_config_path() -> PathBuf {
    Path::new(CONFIG_MOUNT_PATH).join(CONFIG_KEY)
}

/// Parses the arguments (without the program name); `env` looks up environment variables.
pub fn parse_args(
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<CliAction, String> {
    let mut cli = Cli {
        config_path: env("WEIR_PROXY_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(default_config_path),
        workers: 1,
        reload_interval: Duration::from_secs(2),
        access_log: !matches!(
            env("WEIR_PROXY_ACCESS_LOG").as_deref(),
            Some("off" | "false" | "0")
        ),
        otlp_flush_interval: Duration::from_secs(1),
    };
    if let Some(w) = env("WEIR_PROXY_WORKERS") {
        cli.workers = w
            .parse()
            .map_err(|_| format!("WEIR_PROXY_WORKERS: not a number: {w:?}"))?;
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {v:?}"))
        };
        match flag {
            "--config" | "-c" => cli.config_path = PathBuf::from(value(flag)?),
            "--workers" => cli.workers = number(flag, value(flag)?)? as usize,
            "--reload-interval-ms" => {
                cli.reload_interval = Duration::from_millis(number(flag, value(flag)?)?.max(10))
            }
            "--otlp-flush-ms" => {
                cli.otlp_flush_interval = Duration::from_millis(number(flag, value(flag)?)?.max(1))
            }
            "--no-access-log" => cli.access_log = false,
            "--help" | "-h" => return Ok(CliAction::Help),
            "--version" | "-V" => return Ok(CliAction::Version),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(CliAction::Run(cli))
}

/// Reads and validates the config file.
pub fn load(path: &Path) -> Result<(ProxyConfig, Vec<u8>), ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        field: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| ConfigError {
        field: path.display().to_string(),
        message: format!("not UTF-8: {e}"),
    })?;
    let cfg = ProxyConfig::from_json(text)?;
    Ok((cfg, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_override_env_which_overrides_the_default() {
        let none = |_: &str| None;
        let CliAction::Run(c) = parse_args(&[], none).unwrap() else {
            panic!()
        };
        assert_eq!(c.config_path, PathBuf::from("/etc/weir/proxy.json"));
        assert!(c.access_log);
        let env = |k: &str| match k {
            "WEIR_PROXY_CONFIG" => Some("/env/p.json".to_string()),
            "WEIR_PROXY_ACCESS_LOG" => Some("off".to_string()),
            _ => None,
        };
        let CliAction::Run(c) = parse_args(&[], env).unwrap() else {
            panic!()
        };
        assert_eq!(c.config_path, PathBuf::from("/env/p.json"));
        assert!(!c.access_log);
        let CliAction::Run(c) =
            parse_args(&args(&["--config", "/x.json", "--workers=2"]), env).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.config_path, PathBuf::from("/x.json"));
        assert_eq!(c.workers, 2);
        assert!(parse_args(&args(&["--bogus"]), none).is_err());
        assert!(parse_args(&args(&["--config"]), none).is_err());
        assert!(parse_args(&args(&["--workers", "x"]), none).is_err());
    }
}
