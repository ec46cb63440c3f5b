//! Runtime changes an operator made without editing the config file
//! (`lb backend drain|disable|enable|weight`), and where they are kept.
//!
//! They are kept until cleared, like HAProxy's server-state file: a reload
//! leaves them in force (a drained backend stays drained whatever the file's
//! weight says; `lb backend enable` and `lb backend weight ... config` clear
//! them), and they are written to `agent.state_file` at every change, so a
//! restarted agent applies them before it writes anything. Entries for a VIP
//! or backend the config no longer has are dropped.

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::balancer::{AdminState, Balancer};

/// Every backend with a runtime change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeState {
    pub backends: Vec<RuntimeBackend>,
}

/// One backend's runtime change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeBackend {
    /// The VIP's name.
    pub vip: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub admin: AdminState,
    /// A weight in force instead of the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a runtime state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl RuntimeState {
    /// Reads `path`; a missing file is an empty state.
    ///
    /// # Errors
    ///
    /// When it exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, RuntimeError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(RuntimeError::Io { op: "reading", path: path.to_owned(), source }),
        };
        serde_json::from_str(&text).map_err(|source| RuntimeError::Parse { path: path.to_owned(), source })
    }

    /// Writes `path` whole or not at all (a temporary file renamed over it),
    /// creating its directory.
    ///
    /// # Errors
    ///
    /// When the directory or file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), RuntimeError> {
        let io = |op: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| RuntimeError::Io { op, path: p, source }
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        let mut file = fs::File::create(&tmp).map_err(io("writing", &tmp))?;
        file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io("renaming over", path))
    }

    /// The runtime changes `balancer` holds now.
    #[must_use]
    pub fn of(balancer: &Balancer) -> Self {
        let mut backends = Vec::new();
        for vip in balancer.vips() {
            for b in vip.backends.iter().filter(|b| b.admin != AdminState::Ready || b.weight_override.is_some()) {
                backends.push(RuntimeBackend {
                    vip: vip.name.to_owned(),
                    address: b.address,
                    admin: b.admin,
                    weight: b.weight_override,
                });
            }
        }
        RuntimeState { backends }
    }

    /// Records each change in `balancer` without writing the maps (the
    /// caller installs next); returns those whose backend it does not have.
    pub fn restore(&self, balancer: &mut Balancer) -> Vec<&RuntimeBackend> {
        self.backends.iter().filter(|b| !balancer.note_runtime(&b.vip, b.address, b.admin, b.weight)).collect()
    }
}
