//! Loading a persona component: read, compile once, check it against the contract
//! and pre-instantiate it. Every refusal is one line naming what is wrong.

use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::bindings::{CAPABILITIES, PersonaPre, WIT_PACKAGE, WIT_VERSION};
use super::engine::Runtime;
use super::state::HostState;

/// The world's exports a persona must have.
pub const REQUIRED_EXPORTS: &[&str] = &["describe", "on-message"];
/// WASI p2 packages the linker provides (with nothing granted).
const WASI_PACKAGES: &[&str] = &[
    "wasi:cli",
    "wasi:clocks",
    "wasi:filesystem",
    "wasi:io",
    "wasi:random",
    "wasi:sockets",
];

/// Why a component was refused. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{what} is not a WebAssembly file (it does not start with the `\\0asm` magic bytes)")]
    NotWasm { what: String },
    #[error("{what} is truncated: {len} bytes, too short for a WebAssembly header")]
    TooShort { what: String, len: usize },
    #[error(
        "{what} is a core WebAssembly module, not a component: build it for wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { what: String },
    #[error("{what} is not a valid component: {reason}")]
    Invalid { what: String, reason: String },
    #[error(
        "{what} was built for {WIT_PACKAGE}@{found}, but this host serves {WIT_PACKAGE}@{WIT_VERSION}"
    )]
    UnknownVersion { what: String, found: String },
    #[error(
        "{what} is not a roost persona: it does not export `{missing}` (it exports: {exports}); build it for the world {WIT_PACKAGE}/persona@{WIT_VERSION}"
    )]
    WrongWorld {
        what: String,
        missing: String,
        exports: String,
    },
    #[error(
        "{what} imports `{import}`, which roost does not provide (it provides {WIT_PACKAGE}@{WIT_VERSION} and WASI 0.2 cli, clocks, filesystem, io, random, sockets)"
    )]
    UnsupportedImport { what: String, import: String },
    #[error("{what} does not match the {WIT_PACKAGE}@{WIT_VERSION} contract: {reason}")]
    Incompatible { what: String, reason: String },
}

/// What `roost check` reports about a component's contract.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContractInfo {
    /// The `roost:persona` version the component was built against, if it imports
    /// any interface of the package (a persona using no capability imports none).
    pub wit_version: Option<String>,
    /// Capabilities imported (`llm`, `kv`, `history`, `log`, `config`).
    pub capabilities: Vec<String>,
    /// Every import, fully qualified.
    pub imports: Vec<String>,
    /// Every export.
    pub exports: Vec<String>,
    /// Size of the component file.
    pub size_bytes: usize,
}

/// A compiled, checked and pre-instantiated persona: cheap to instantiate.
pub struct PersonaComponent {
    /// Name for logs: the file stem (`echo` for `echo.wasm`).
    pub label: String,
    pub path: Option<PathBuf>,
    pub component: Component,
    pub pre: PersonaPre<HostState>,
    pub info: ContractInfo,
}

impl std::fmt::Debug for PersonaComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersonaComponent")
            .field("label", &self.label)
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

/// A wasmtime error chain on one line: `outer: cause: root`.
pub fn one_line(err: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// The label for a persona file: its stem.
pub fn label_for(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("persona")
        .to_string()
}

/// Checks the header: empty, too short, not wasm, a core module.
pub fn check_header(what: &str, bytes: &[u8]) -> Result<(), LoadError> {
    let what = what.to_string();
    if bytes.is_empty() {
        return Err(LoadError::Empty { what });
    }
    if bytes.len() < 8 {
        if !b"\0asm".starts_with(&bytes[..bytes.len().min(4)]) {
            return Err(LoadError::NotWasm { what });
        }
        return Err(LoadError::TooShort {
            what,
            len: bytes.len(),
        });
    }
    if &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm { what });
    }
    // Version and layer: 1/0 is a core module, 0x0d/1 a component.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule { what });
    }
    Ok(())
}

impl Runtime {
    /// Reads, compiles and checks a persona file. Compiling is CPU-heavy (tens of ms
    /// for a small Rust persona, seconds for a Python one): call it off the async
    /// runtime (`spawn_blocking`).
    pub fn load_file(&self, path: &Path) -> Result<PersonaComponent, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: path.display().to_string(),
            reason: io_reason(&e),
        })?;
        let mut c = self.load_bytes(&label_for(path), &path.display().to_string(), &bytes)?;
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// Compiles and checks component bytes. `what` names them in errors.
    pub fn load_bytes(
        &self,
        label: &str,
        what: &str,
        bytes: &[u8],
    ) -> Result<PersonaComponent, LoadError> {
        check_header(what, bytes)?;
        let component = Component::new(self.engine(), bytes).map_err(|e| LoadError::Invalid {
            what: what.to_string(),
            reason: one_line(&e),
        })?;
        self.prepare(label, what, component, bytes.len())
    }

    /// Checks an already compiled component (e.g. from the compile cache) against
    /// the contract and pre-instantiates it.
    pub fn prepare(
        &self,
        label: &str,
        what: &str,
        component: Component,
        size_bytes: usize,
    ) -> Result<PersonaComponent, LoadError> {
        let info = contract_info(self, what, &component, size_bytes)?;
        let pre =
            self.linker()
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Incompatible {
                    what: what.to_string(),
                    reason: one_line(&e),
                })?;
        let pre = PersonaPre::new(pre).map_err(|e| LoadError::Incompatible {
            what: what.to_string(),
            reason: one_line(&e),
        })?;
        Ok(PersonaComponent {
            label: label.to_string(),
            path: None,
            component,
            pre,
            info,
        })
    }
}

pub(crate) fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

/// Reads the component's imports and exports and checks them against the contract.
fn contract_info(
    rt: &Runtime,
    what: &str,
    component: &Component,
    size_bytes: usize,
) -> Result<ContractInfo, LoadError> {
    let ty = component.component_type();
    let mut imports = Vec::new();
    let mut capabilities = Vec::new();
    let mut wit_version = None;
    for (name, _item) in ty.imports(rt.engine()) {
        imports.push(name.to_string());
        let (path, version) = match name.split_once('@') {
            Some((p, v)) => (p, Some(v)),
            None => (name, None),
        };
        let (package, interface) = path.split_once('/').unwrap_or((path, ""));
        if package == WIT_PACKAGE {
            let version = version.unwrap_or("unversioned");
            if !version_served(version) {
                return Err(LoadError::UnknownVersion {
                    what: what.to_string(),
                    found: version.to_string(),
                });
            }
            wit_version.get_or_insert_with(|| version.to_string());
            if CAPABILITIES.contains(&interface) {
                capabilities.push(interface.to_string());
            } else if interface != "types" {
                return Err(LoadError::UnsupportedImport {
                    what: what.to_string(),
                    import: name.to_string(),
                });
            }
        } else if !WASI_PACKAGES.contains(&package) {
            return Err(LoadError::UnsupportedImport {
                what: what.to_string(),
                import: name.to_string(),
            });
        }
    }
    let exports: Vec<String> = ty
        .exports(rt.engine())
        .filter(|(_, item)| !matches!(item.ty, ComponentItem::Type(_)))
        .map(|(n, _)| n.to_string())
        .collect();
    for required in REQUIRED_EXPORTS {
        if !exports.iter().any(|e| e == required) {
            return Err(LoadError::WrongWorld {
                what: what.to_string(),
                missing: required.to_string(),
                exports: if exports.is_empty() {
                    "nothing".into()
                } else {
                    exports.join(", ")
                },
            });
        }
    }
    capabilities.sort();
    capabilities.dedup();
    Ok(ContractInfo {
        wit_version,
        capabilities,
        imports,
        exports,
        size_bytes,
    })
}

/// `0.1.x` is served: 0.x versions are compatible within a minor version.
fn version_served(version: &str) -> bool {
    let mut want = WIT_VERSION.split('.');
    let mut got = version.split('.');
    let (Some(wmaj), Some(wmin)) = (want.next(), want.next()) else {
        return false;
    };
    let (Some(gmaj), Some(gmin)) = (got.next(), got.next()) else {
        return false;
    };
    wmaj == gmaj
        && wmin == gmin
        && got
            .next()
            .is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_told_apart() {
        assert!(matches!(
            check_header("f", b""),
            Err(LoadError::Empty { .. })
        ));
        assert!(matches!(
            check_header("f", b"\0as"),
            Err(LoadError::TooShort { .. })
        ));
        assert!(matches!(
            check_header("f", b"hello world"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header("f", b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_header("f", b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn only_the_served_minor_version_is_accepted() {
        assert!(version_served("0.1.0"));
        assert!(version_served("0.1.7"));
        assert!(!version_served("0.2.0"));
        assert!(!version_served("1.0.0"));
        assert!(!version_served("0.1"));
        assert!(!version_served("garbage"));
    }
}
