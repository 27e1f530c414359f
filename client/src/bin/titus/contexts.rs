//! The CLI's configuration file: named contexts (servers, CA, certificate or token), one of them
//! current, as kubectl's kubeconfig. `~/.config/titus/config.toml` ($XDG_CONFIG_HOME honored;
//! `TITUS_CLI_CONFIG` names another file). Flags and environment variables override the context's
//! values; `--context`/`TITUS_CONTEXT` picks another context for one call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use titus_client::Error;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_context: String,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    /// Api addresses of any replicas, comma-separated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub servers: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (the token itself is never written here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument { message, violations: vec![] }
}

/// Where the configuration file is.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TITUS_CLI_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("titus").join("config.toml"))
}

impl CliConfig {
    /// The file at `path`; an absent file is an empty configuration.
    pub fn load(path: &Path) -> Result<CliConfig, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
            Err(e) => Err(invalid(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes it (aside, then renamed), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let text = toml::to_string_pretty(self).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
        }
        let aside = path.with_extension("toml.new");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options.open(&aside)?.write_all(text.as_bytes())?;
            std::fs::rename(&aside, path)
        };
        write().map_err(|e| invalid(format!("{}: {e}", path.display())))
    }

    /// The context named `name`, or the current one when `name` is None; None when neither is set.
    pub fn context(&self, name: Option<&str>) -> Result<Option<(&str, &Context)>, Error> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None if self.current_context.is_empty() => return Ok(None),
            None => self.current_context.as_str(),
        };
        match self.contexts.get_key_value(name) {
            Some((n, c)) => Ok(Some((n.as_str(), c))),
            None => Err(Error::NotFound(format!(
                "context {name:?} is not in the configuration (titus config get-contexts lists them)"
            ))),
        }
    }
}

/// A context's token, read from its file.
pub fn read_token(file: &Path) -> Result<String, Error> {
    std::fs::read_to_string(file)
        .map(|t| t.trim().to_string())
        .map_err(|e| invalid(format!("token-file {}: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_the_current_one_is_picked() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        assert!(CliConfig::load(&path).unwrap().context(None).unwrap().is_none(), "no file: no context");
        let mut c = CliConfig::default();
        c.contexts.insert("prod".into(), Context { servers: "p:1".into(), ..Default::default() });
        c.contexts.insert(
            "local".into(),
            Context { servers: "l:1".into(), ca: Some("/ca.pem".into()), ..Default::default() },
        );
        c.current_context = "local".into();
        c.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let back = CliConfig::load(&path).unwrap();
        assert_eq!(back.context(None).unwrap().unwrap().1.servers, "l:1");
        assert_eq!(back.context(Some("prod")).unwrap().unwrap().1.servers, "p:1");
        assert!(matches!(back.context(Some("nope")), Err(Error::NotFound(_))));
        std::fs::write(&path, "current-context = 1\n").unwrap();
        assert!(matches!(CliConfig::load(&path), Err(Error::InvalidArgument { .. })), "a bad file is said");
    }
}
