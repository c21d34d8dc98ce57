//! The compile cache: precompiled persona code in `<state>/cache/`, so an unchanged
//! persona loads in a fraction of a millisecond instead of being compiled again (tens
//! of milliseconds for a small Rust persona, seconds for a Python one), at start-up
//! and whenever a file returns to an earlier version.
//!
//! - **Key**: SHA-256 over the cache format version, the engine's
//!   [`precompile_compatibility_hash`](wasmtime::Engine::precompile_compatibility_hash)
//!   (wasmtime version, compiler settings, target features) and the SHA-256 of the
//!   component bytes. A different engine or different bytes never share an entry.
//! - **Entry** (`<key>.cwasm`): a header — magic `ROOSTCC\0`, format version, the key,
//!   the payload length and the payload's SHA-256 — then the bytes of
//!   [`Component::serialize`]. Written to a temporary file and renamed into place, so a
//!   reader never sees half an entry.
//! - **Trust**: [`Component::deserialize`] is `unsafe` (the bytes become executable
//!   code). An entry is deserialized only if its magic, version, key, length and payload
//!   checksum all match; anything else is *corrupt*: it is deleted, the component is
//!   compiled again and the entry rewritten ([`CacheOutcome::Rebuilt`]). wasmtime's own
//!   header check (engine version and settings) refuses a mismatched payload the same
//!   way. The cache folder lives in the state folder and must be as private as the
//!   credentials next to it (it is created `0700`).
//! - **Size**: bounded (default 256 MiB). Every insert evicts the least recently used
//!   entries (by modification time; a hit touches its entry) until the total fits.
//!
//! ```no_run
//! use roost::plugin::cache::{CacheOutcome, CompileCache};
//! use roost::plugin::{Runtime, RuntimeConfig};
//!
//! # fn demo() -> anyhow::Result<()> {
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let cache = CompileCache::open("state/cache".as_ref(), 256 << 20, runtime.engine())?;
//! let (component, outcome) = runtime.load_file_cached("plugins/echo.wasm".as_ref(), &cache)?;
//! println!("{}: {outcome:?}", component.label); // Miss the first time, Hit afterwards
//! # let _ = CacheOutcome::Hit;
//! # Ok(()) }
//! ```

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::component::{LoadError, PersonaComponent, check_header, io_reason, label_for, one_line};
use super::engine::{Runtime, pooling_refused};

/// Bumped whenever the entry layout or what the key covers changes.
pub const FORMAT_VERSION: u32 = 1;
/// The first bytes of every entry.
pub const MAGIC: &[u8; 8] = b"ROOSTCC\0";
/// Default bound on the cache's total size.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Entry file extension.
const EXT: &str = "cwasm";
/// magic + version + key + payload length + payload checksum.
const HEADER_LEN: usize = 8 + 4 + 32 + 8 + 32;
/// Temporary files older than this are leftovers of a crash and removed on open.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Where a loaded component's code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    /// Not compiled: deserialized from a valid cache entry, or the same bytes were
    /// already loaded in this process and their code is shared.
    Hit,
    /// No entry (or the cache is disabled): compiled, and stored if enabled.
    Miss,
    /// The entry was corrupt or did not match this engine: deleted, compiled again
    /// and rewritten.
    Rebuilt,
}

/// SHA-256 of component bytes.
pub type ContentHash = [u8; 32];

/// SHA-256 of `bytes`.
pub fn content_hash(bytes: &[u8]) -> ContentHash {
    Sha256::digest(bytes).into()
}

/// A cache key: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// A `Hasher` that feeds everything into SHA-256: makes any `Hash` value (here the
/// engine's compatibility hash) a stable digest instead of a per-process `u64`.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let d = self.0.clone().finalize();
        u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
    }
}

/// The engine's compatibility hash as a stable digest.
pub fn engine_digest(engine: &Engine) -> [u8; 32] {
    let mut h = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().into()
}

/// What [`CompileCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A checked payload (safe to hand to `Component::deserialize` with this engine).
    Found(Vec<u8>),
    /// No entry.
    Absent,
    /// An entry that failed a check (deleted); the reason, for the log.
    Corrupt(String),
}

/// Counters of one cache.
#[derive(Debug, Default)]
struct Counters {
    evicted: AtomicU64,
    write_errors: AtomicU64,
}

/// The compile cache of one engine. Cheap to share by reference; every operation
/// is a few file system calls.
#[derive(Debug)]
pub struct CompileCache {
    /// `None`: disabled (every load is a [`CacheOutcome::Miss`] and nothing is written).
    dir: Option<PathBuf>,
    max_bytes: u64,
    engine: [u8; 32],
    counters: Counters,
}

impl CompileCache {
    /// Opens (creating it `0700` if needed) the cache folder `dir`, bounded to
    /// `max_bytes`, for components compiled by `engine`. Removes temporary files a
    /// crash left behind.
    pub fn open(dir: &Path, max_bytes: u64, engine: &Engine) -> std::io::Result<CompileCache> {
        fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let cache = CompileCache {
            dir: Some(dir.to_path_buf()),
            max_bytes,
            engine: engine_digest(engine),
            counters: Counters::default(),
        };
        cache.remove_stale_temporaries();
        Ok(cache)
    }

    /// A cache that stores nothing.
    pub fn disabled(engine: &Engine) -> CompileCache {
        CompileCache {
            dir: None,
            max_bytes: 0,
            engine: engine_digest(engine),
            counters: Counters::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Entries evicted to stay within the size bound, since open.
    pub fn evicted(&self) -> u64 {
        self.counters.evicted.load(Ordering::Relaxed)
    }

    /// Entries that could not be written (the load itself succeeded), since open.
    pub fn write_errors(&self) -> u64 {
        self.counters.write_errors.load(Ordering::Relaxed)
    }

    /// The key of component bytes whose SHA-256 is `content`.
    pub fn key(&self, content: &ContentHash) -> CacheKey {
        let mut h = Sha256::new();
        h.update(b"roost compile cache");
        h.update(FORMAT_VERSION.to_le_bytes());
        h.update(self.engine);
        h.update(content);
        CacheKey(h.finalize().into())
    }

    /// The file of an entry.
    pub fn entry_path(&self, key: &CacheKey) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{}.{EXT}", key.hex())))
    }

    /// Reads and checks the entry for `key`. A corrupt entry is deleted.
    pub fn lookup(&self, key: &CacheKey) -> Lookup {
        let Some(path) = self.entry_path(key) else {
            return Lookup::Absent;
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Absent,
            Err(e) => return self.discard(&path, format!("unreadable: {}", io_reason(&e))),
        };
        match check_entry(&bytes, key) {
            Ok(()) => {
                // A hit makes the entry the most recently used.
                if let Ok(f) = fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                let mut bytes = bytes;
                bytes.drain(..HEADER_LEN);
                Lookup::Found(bytes)
            }
            Err(reason) => self.discard(&path, reason),
        }
    }

    /// Deletes the entry for `key` (e.g. after wasmtime refused its payload).
    pub fn remove(&self, key: &CacheKey) {
        if let Some(path) = self.entry_path(key) {
            let _ = fs::remove_file(path);
        }
    }

    fn discard(&self, path: &Path, reason: String) -> Lookup {
        let _ = fs::remove_file(path);
        Lookup::Corrupt(reason)
    }

    /// Writes the entry for `key` atomically (temporary file, fsync, rename), then
    /// evicts the least recently used entries until the cache fits its bound. A
    /// payload larger than the whole bound is not stored.
    pub fn store(&self, key: &CacheKey, payload: &[u8]) -> std::io::Result<()> {
        let (Some(dir), Some(path)) = (self.dir.as_ref(), self.entry_path(key)) else {
            return Ok(());
        };
        let total = (HEADER_LEN + payload.len()) as u64;
        if total > self.max_bytes {
            tracing::info!(
                entry_bytes = total,
                max_bytes = self.max_bytes,
                "compiled persona larger than the whole compile cache: not cached"
            );
            return Ok(());
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{:x}",
            key.hex(),
            std::process::id(),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&header(key, payload))?;
            f.write_all(payload)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            return result;
        }
        self.evict(&path);
        Ok(())
    }

    /// Removes the oldest entries (by mtime) until the total is within the bound,
    /// never `keep`.
    fn evict(&self, keep: &Path) {
        let Some(dir) = &self.dir else { return };
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == EXT))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    e.path(),
                ))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        if total <= self.max_bytes {
            return;
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
                self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(entry = %path.display(), "compile cache entry evicted (size bound)");
            }
        }
    }

    fn remove_stale_temporaries(&self) {
        let Some(dir) = &self.dir else { return };
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let stale = e.file_name().to_string_lossy().starts_with(".tmp-")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TMP);
            if stale {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn header(key: &CacheKey, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&key.0);
    h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    h.extend_from_slice(&Sha256::digest(payload));
    h
}

/// Checks an entry's header against `key` and its payload against the checksum.
fn check_entry(bytes: &[u8], key: &CacheKey) -> Result<(), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("{} bytes, shorter than the header", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    if bytes[12..44] != key.0 {
        return Err("key mismatch".into());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[44..52]);
    let len = u64::from_le_bytes(len);
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        ));
    }
    if Sha256::digest(payload).as_slice() != &bytes[52..84] {
        return Err("payload checksum mismatch".into());
    }
    Ok(())
}

impl Runtime {
    /// [`Runtime::load_file`] through the compile cache. Call it off the async
    /// runtime (`spawn_blocking`): a miss compiles.
    pub fn load_file_cached(
        &self,
        path: &Path,
        cache: &CompileCache,
    ) -> Result<(PersonaComponent, CacheOutcome), LoadError> {
        let bytes = fs::read(path).map_err(|e| LoadError::Read {
            path: path.display().to_string(),
            reason: io_reason(&e),
        })?;
        let (mut c, outcome) =
            self.load_bytes_cached(&label_for(path), &path.display().to_string(), &bytes, cache)?;
        c.path = Some(path.to_path_buf());
        Ok((c, outcome))
    }

    /// [`Runtime::load_bytes`] through the compile cache. Bytes already loaded in
    /// this process (and still in use) share that code: no compile, no cache read
    /// ([`CacheOutcome::Hit`]).
    pub fn load_bytes_cached(
        &self,
        label: &str,
        what: &str,
        bytes: &[u8],
        cache: &CompileCache,
    ) -> Result<(PersonaComponent, CacheOutcome), LoadError> {
        check_header(what, bytes)?;
        let hash = content_hash(bytes);
        if let Some(c) = self.shared(label, &hash) {
            return Ok((c, CacheOutcome::Hit));
        }
        if !cache.enabled() {
            let component = self.compile(what, bytes)?;
            let c = self.prepare_shared(label, what, component, bytes.len(), hash)?;
            return Ok((c, CacheOutcome::Miss));
        }
        let key = cache.key(&hash);
        let mut outcome = CacheOutcome::Miss;
        match cache.lookup(&key) {
            Lookup::Found(payload) => match self.deserialize_checked(&payload) {
                Ok(component) => {
                    let c = self.prepare_shared(label, what, component, bytes.len(), hash)?;
                    return Ok((c, CacheOutcome::Hit));
                }
                Err(e) => {
                    cache.remove(&key);
                    tracing::warn!(
                        persona = label,
                        "compile cache entry refused by the engine ({}); rebuilding it",
                        one_line(&e)
                    );
                    outcome = CacheOutcome::Rebuilt;
                }
            },
            Lookup::Absent => {}
            Lookup::Corrupt(reason) => {
                tracing::warn!(
                    persona = label,
                    "compile cache entry corrupt ({reason}); rebuilding it"
                );
                outcome = CacheOutcome::Rebuilt;
            }
        }
        let component = self.compile(what, bytes)?;
        let c = self.prepare_shared(label, what, component, bytes.len(), hash)?;
        match c.component.serialize() {
            Ok(payload) => {
                if let Err(e) = cache.store(&key, &payload) {
                    tracing::warn!(persona = label, "compile cache entry not written: {e}");
                }
            }
            Err(e) => tracing::warn!(
                persona = label,
                "component not serialisable for the cache: {}",
                one_line(&e)
            ),
        }
        Ok((c, outcome))
    }

    /// Deserializes a checked cache payload with the primary engine, or with the
    /// on-demand engine if the pooling allocator refuses the component.
    fn deserialize_checked(&self, payload: &[u8]) -> wasmtime::Result<Component> {
        // SAFETY: `payload` is exactly what `store` wrote for this key: the header
        // names this key (which covers this engine's compatibility hash and these
        // component bytes) and the payload matches the checksum written with it.
        // wasmtime checks its own header again. The on-demand engine has the same
        // compatibility hash (only the allocation strategy differs).
        match unsafe { Component::deserialize(self.engine(), payload) } {
            Err(e) if self.pooling() && pooling_refused(&e) => match self.on_demand() {
                // SAFETY: as above.
                Ok(backend) => unsafe { Component::deserialize(&backend.engine, payload) },
                Err(_) => Err(e),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == EXT))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_stored_entry_is_found_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 1 << 20, &engine()).unwrap();
        let key = cache.key(&content_hash(b"component"));
        assert!(matches!(cache.lookup(&key), Lookup::Absent));
        cache.store(&key, b"compiled code").unwrap();
        match cache.lookup(&key) {
            Lookup::Found(p) => assert_eq!(p, b"compiled code"),
            other => panic!("{other:?}"),
        }
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn keys_cover_content_and_engine() {
        let e = engine();
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 1 << 20, &e).unwrap();
        let a = cache.key(&content_hash(b"a"));
        assert_eq!(a, cache.key(&content_hash(b"a")));
        assert_ne!(a, cache.key(&content_hash(b"b")));
        assert_eq!(
            engine_digest(&e),
            engine_digest(&engine()),
            "stable across engines with one config"
        );
        let mut other = wasmtime::Config::new();
        other.epoch_interruption(true);
        let other = CompileCache::disabled(&Engine::new(&other).unwrap());
        assert_ne!(
            a,
            other.key(&content_hash(b"a")),
            "another engine config, another key"
        );
    }

    #[test]
    fn corrupt_entries_are_detected_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), 1 << 20, &engine()).unwrap();
        let key = cache.key(&content_hash(b"x"));
        let other = cache.key(&content_hash(b"y"));
        let path = cache.entry_path(&key).unwrap();
        type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
        let corruptions: Vec<(&str, Corrupt)> = vec![
            (
                "flipped payload byte",
                Box::new(|b| *b.last_mut().unwrap() ^= 1),
            ),
            ("truncated", Box::new(|b| b.truncate(b.len() - 3))),
            ("bad magic", Box::new(|b| b[0] = b'X')),
            ("other version", Box::new(|b| b[8] = 99)),
            ("garbage", Box::new(|b| *b = b"garbage".to_vec())),
            (
                "another key's entry",
                Box::new(move |b| b[12..44].copy_from_slice(&other.0)),
            ),
        ];
        for (what, corrupt) in corruptions {
            cache.store(&key, b"payload bytes").unwrap();
            let mut bytes = fs::read(&path).unwrap();
            corrupt(&mut bytes);
            fs::write(&path, &bytes).unwrap();
            assert!(
                matches!(cache.lookup(&key), Lookup::Corrupt(_)),
                "{what} not detected"
            );
            assert!(!path.exists(), "{what}: corrupt entry kept");
        }
    }

    #[test]
    fn the_size_bound_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let entry = (HEADER_LEN + 1000) as u64;
        let cache = CompileCache::open(dir.path(), entry * 3, &engine()).unwrap();
        let keys: Vec<CacheKey> = (0..5u8).map(|i| cache.key(&content_hash(&[i]))).collect();
        let old = SystemTime::now() - Duration::from_secs(100);
        for (i, k) in keys.iter().take(3).enumerate() {
            cache.store(k, &[i as u8; 1000]).unwrap();
            let f = fs::File::options()
                .write(true)
                .open(cache.entry_path(k).unwrap())
                .unwrap();
            f.set_modified(old + Duration::from_secs(i as u64)).unwrap();
        }
        // Using entry 0 makes entry 1 the least recently used.
        assert!(matches!(cache.lookup(&keys[0]), Lookup::Found(_)));
        cache.store(&keys[3], &[3; 1000]).unwrap();
        assert_eq!(entries(dir.path()).len(), 3);
        assert!(cache.entry_path(&keys[0]).unwrap().exists());
        assert!(!cache.entry_path(&keys[1]).unwrap().exists());
        assert_eq!(cache.evicted(), 1);
        // Larger than the whole bound: not stored, nothing evicted.
        cache.store(&keys[4], &vec![4; 5000]).unwrap();
        assert!(!cache.entry_path(&keys[4]).unwrap().exists());
        assert_eq!(entries(dir.path()).len(), 3);
    }

    #[test]
    fn a_disabled_cache_stores_nothing() {
        let cache = CompileCache::disabled(&engine());
        let key = cache.key(&content_hash(b"a"));
        cache.store(&key, b"x").unwrap();
        assert!(matches!(cache.lookup(&key), Lookup::Absent));
    }

    #[test]
    fn stale_temporaries_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".tmp-abc-1-2");
        let fresh = dir.path().join(".tmp-def-1-2");
        fs::write(&stale, b"x").unwrap();
        fs::write(&fresh, b"x").unwrap();
        let f = fs::File::options().write(true).open(&stale).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        drop(f);
        CompileCache::open(dir.path(), 1 << 20, &engine()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists(), "another process may be writing it");
    }
}
