//! Loading a persona component: read, compile once, check it against the contract
//! and pre-instantiate it. Every refusal is one line naming what is wrong.
//!
//! **Shared code.** Identical bytes are compiled once per process: the compiled
//! [`Component`], its contract check and its [`PersonaPre`] live in one
//! [`SharedCode`], found by the bytes' SHA-256 while any [`PersonaComponent`] still
//! uses it (the registry holds it weakly, so unloading the last user frees it).
//! Each `PersonaComponent` keeps its own label and path: 5,000 copies of `echo.wasm`
//! under different names are 5,000 bots and one compiled component.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};

use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::bindings::{CAPABILITIES, PersonaPre, WIT_PACKAGE, WIT_VERSION};
use super::cache::{ContentHash, content_hash};
use super::engine::{CodeMap, Runtime, pooling_refused};
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

/// Compiled, checked and pre-instantiated code, shared by every
/// [`PersonaComponent`] loaded from the same bytes.
pub struct SharedCode {
    pub component: Component,
    pub pre: PersonaPre<HostState>,
    pub info: ContractInfo,
    /// SHA-256 of the bytes (`None`: prepared from an already compiled component,
    /// not shared).
    hash: Option<ContentHash>,
    registry: Weak<CodeMap>,
    /// The same code for the on-demand engine, made the first time the pooling
    /// allocator refuses an instance of it.
    on_demand: OnceLock<Result<PersonaPre<HostState>, String>>,
}

impl SharedCode {
    /// SHA-256 of the component bytes, if loaded from bytes.
    pub fn hash(&self) -> Option<&ContentHash> {
        self.hash.as_ref()
    }

    /// The pre-instantiated code for the on-demand engine (the same code, moved over
    /// through its serialized form, once).
    pub(crate) fn on_demand_pre(&self, rt: &Runtime) -> Result<PersonaPre<HostState>, String> {
        let backend = rt.on_demand()?;
        if Engine::same(self.component.engine(), &backend.engine) {
            return Ok(self.pre.clone());
        }
        self.on_demand
            .get_or_init(|| {
                let code = self.component.serialize().map_err(|e| one_line(&e))?;
                // SAFETY: `code` is what `Component::serialize` produced in this
                // process, for an engine with the same compiler settings (they differ
                // only in the allocation strategy); wasmtime checks its header again.
                let component = unsafe { Component::deserialize(&backend.engine, &code) }
                    .map_err(|e| one_line(&e))?;
                let pre = backend
                    .linker
                    .instantiate_pre(&component)
                    .map_err(|e| one_line(&e))?;
                PersonaPre::new(pre).map_err(|e| one_line(&e))
            })
            .clone()
    }
}

impl Drop for SharedCode {
    fn drop(&mut self) {
        let (Some(hash), Some(registry)) = (self.hash, self.registry.upgrade()) else {
            return;
        };
        let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&hash).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&hash);
        }
    }
}

/// A compiled, checked and pre-instantiated persona: cheap to instantiate. The
/// code ([`SharedCode`]: `component`, `pre`, `info`, reached through `Deref`) is
/// shared with every other load of the same bytes; the label and path are this
/// file's.
pub struct PersonaComponent {
    /// Name for logs: the file stem (`echo` for `echo.wasm`).
    pub label: String,
    pub path: Option<PathBuf>,
    code: Arc<SharedCode>,
}

impl PersonaComponent {
    /// The shared code.
    pub fn code(&self) -> &Arc<SharedCode> {
        &self.code
    }

    /// Whether `self` and `other` run the very same compiled code.
    pub fn shares_code_with(&self, other: &PersonaComponent) -> bool {
        Arc::ptr_eq(&self.code, &other.code)
    }
}

impl Deref for PersonaComponent {
    type Target = SharedCode;
    fn deref(&self) -> &SharedCode {
        &self.code
    }
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

    /// Compiles and checks component bytes. `what` names them in errors. Bytes
    /// already loaded (and still in use) are not compiled again: the new
    /// `PersonaComponent` shares their code.
    pub fn load_bytes(
        &self,
        label: &str,
        what: &str,
        bytes: &[u8],
    ) -> Result<PersonaComponent, LoadError> {
        check_header(what, bytes)?;
        let hash = content_hash(bytes);
        if let Some(c) = self.shared(label, &hash) {
            return Ok(c);
        }
        let component = self.compile(what, bytes)?;
        self.prepare_shared(label, what, component, bytes.len(), hash)
    }

    /// Checks an already compiled component (e.g. from the compile cache) against
    /// the contract and pre-instantiates it. (Not shared: the bytes are unknown.)
    pub fn prepare(
        &self,
        label: &str,
        what: &str,
        component: Component,
        size_bytes: usize,
    ) -> Result<PersonaComponent, LoadError> {
        let code = self.check_and_pre(what, component, size_bytes, None)?;
        Ok(PersonaComponent {
            label: label.to_string(),
            path: None,
            code: Arc::new(code),
        })
    }

    /// A new `PersonaComponent` for bytes whose SHA-256 is `hash`, if their code is
    /// loaded.
    pub fn shared(&self, label: &str, hash: &ContentHash) -> Option<PersonaComponent> {
        let map = self
            .code_registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let code = map.get(hash)?.upgrade()?;
        Some(PersonaComponent {
            label: label.to_string(),
            path: None,
            code,
        })
    }

    /// [`Runtime::prepare`] for bytes whose SHA-256 is `hash`, registering the code
    /// for later loads of the same bytes (if another load registered it first, that
    /// code is used).
    pub(crate) fn prepare_shared(
        &self,
        label: &str,
        what: &str,
        component: Component,
        size_bytes: usize,
        hash: ContentHash,
    ) -> Result<PersonaComponent, LoadError> {
        let code = self.check_and_pre(what, component, size_bytes, Some(hash))?;
        let mut map = self
            .code_registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let code = match map.get(&hash).and_then(Weak::upgrade) {
            Some(existing) => existing,
            None => {
                let code = Arc::new(code);
                map.insert(hash, Arc::downgrade(&code));
                code
            }
        };
        drop(map);
        Ok(PersonaComponent {
            label: label.to_string(),
            path: None,
            code,
        })
    }

    /// Compiles bytes with the primary engine, or, if the pooling allocator refuses
    /// the component (beyond its per-component limits), with the on-demand engine.
    pub(crate) fn compile(&self, what: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let invalid = |e: &wasmtime::Error| LoadError::Invalid {
            what: what.to_string(),
            reason: one_line(e),
        };
        match Component::new(self.engine(), bytes) {
            Ok(c) => Ok(c),
            Err(e) if self.pooling() && pooling_refused(&e) => {
                let backend = self.on_demand().map_err(|reason| LoadError::Invalid {
                    what: what.to_string(),
                    reason,
                })?;
                tracing::info!(
                    component = what,
                    "the pooling allocator refuses this component ({}); it runs with on-demand allocation",
                    one_line(&e)
                );
                Component::new(&backend.engine, bytes).map_err(|e| invalid(&e))
            }
            Err(e) => Err(invalid(&e)),
        }
    }

    fn check_and_pre(
        &self,
        what: &str,
        component: Component,
        size_bytes: usize,
        hash: Option<ContentHash>,
    ) -> Result<SharedCode, LoadError> {
        let info = contract_info(what, &component, size_bytes)?;
        let pre = self
            .linker_for(component.engine())
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Incompatible {
                what: what.to_string(),
                reason: one_line(&e),
            })?;
        let pre = PersonaPre::new(pre).map_err(|e| LoadError::Incompatible {
            what: what.to_string(),
            reason: one_line(&e),
        })?;
        Ok(SharedCode {
            component,
            pre,
            info,
            hash,
            registry: hash.map_or_else(Weak::new, |_| Arc::downgrade(self.code_registry())),
            on_demand: OnceLock::new(),
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
    what: &str,
    component: &Component,
    size_bytes: usize,
) -> Result<ContractInfo, LoadError> {
    let engine = component.engine();
    let ty = component.component_type();
    let mut imports = Vec::new();
    let mut capabilities = Vec::new();
    let mut wit_version = None;
    for (name, _item) in ty.imports(engine) {
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
        .exports(engine)
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
