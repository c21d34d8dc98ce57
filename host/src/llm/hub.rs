//! [`LlmHub`]: the providers, built once from config, and the per-persona backends that
//! apply each persona's grant.
//!
//! A backend ([`LlmHub::backend_for`]) turns a persona's `llm.complete` into a provider
//! call, in this order:
//!
//! 1. **Validate**: at least one non-empty user or assistant turn, temperature finite
//!    and within 0.0-2.0, `max-tokens` at least 1; otherwise `invalid-request`.
//! 2. **Model**: the request's hint is used when it is the persona's model or in its
//!    `models` list; any other hint is ignored and the persona's model answers (the WIT
//!    contract: "honoured only if the operator allows it"). A debug line notes it.
//! 3. **Budget** (before the call, then **reserved** once a slot is free): the
//!    tokens charged in the last hour and day plus a conservative bound on the input
//!    (a token per UTF-8 byte, see [`ChatRequest::input_token_bound`]) and one output
//!    token must fit `tokens_per_hour` / `tokens_per_day`, else
//!    `budget-exhausted("hourly budget of N tokens spent; refills in M min")`. A
//!    request whose input bound is larger than a whole budget is an `invalid-request`
//!    (waiting would not help). See [`budget`](super::budget).
//! 4. **Concurrency**: at most `max_concurrency` calls in flight per persona (a tokio
//!    semaphore); others wait for a slot.
//! 5. **Timeout**: the persona's `timeout_ms` (default: the provider's) bounds the wait
//!    for a slot and the call together → `timeout`.
//! 6. **Call** the provider with `max_tokens` capped at the persona's `max_tokens` and
//!    at what the budgets leave after the input bound: the reservation is the input
//!    bound plus that `max_tokens`, so no call (and no set of concurrent calls) can
//!    spend past a budget.
//! 7. **Reconcile**: the reservation becomes the provider's usage, or without one the
//!    input bound plus a token per byte of output. A call that timed out is charged
//!    its input bound; other failures nothing. Budgets are kept in the state database
//!    ([`LlmHub::with_store`]) and survive a restart.
//! 8. **Answer** with the model's text only. Every key the host holds is redacted from
//!    the text, the model name and error reasons before they reach the persona.
//!
//! Provider failures map to `rate-limited` (429 after retries), `timeout`,
//! `invalid-request` (the provider refused the request: 400, 413, 422) and
//! `provider(short reason)` (everything else); the detail goes to the host's log.
//!
//! Budgets and concurrency slots belong to the persona's name: a persona reloaded
//! (and given a new backend) keeps what it has spent.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::anthropic::AnthropicProvider;
use super::budget::{BudgetUsage, Changed, Ledger, Refusal, Reservation};
use super::config::{LlmConfig, LlmSetupError, PersonaLlmConfig, ProviderKind};
use super::http::HttpSettings;
use super::openai::OpenAiProvider;
use super::provider::{ChatRequest, Provider, ProviderError, Role, Usage, token_bound};
use super::secret::SecretSet;
use crate::plugin::bindings::llm;
use crate::plugin::context::{BoxFuture, LlmBackend};
use crate::store::Store;

/// Model names longer than this are cut before they reach a persona.
const MAX_MODEL_NAME: usize = 200;

#[derive(Clone)]
struct ProviderEntry {
    provider: Arc<dyn Provider>,
    timeout: Duration,
}

/// What one persona's backends share: budgets and concurrency slots.
struct PersonaShared {
    persona: String,
    ledger: Mutex<Ledger>,
    slots: Mutex<Option<(u32, Arc<Semaphore>)>>,
    /// Where the ledger's buckets are kept across restarts.
    store: Option<Store>,
}

impl PersonaShared {
    /// The persona's budgets, restored from `store` when there is one.
    fn new(persona: &str, store: Option<Store>) -> Self {
        let rows = store.as_ref().map_or_else(Vec::new, |st| {
            let since = crate::store::now_ms() - super::budget::DAY.as_millis() as i64;
            st.llm_budget_load(persona, since).unwrap_or_else(|e| {
                tracing::error!(persona, error = %e, "llm budget could not be restored; starting empty");
                Vec::new()
            })
        });
        PersonaShared {
            persona: persona.to_string(),
            ledger: Mutex::new(Ledger::restore(
                Instant::now(),
                crate::store::now_ms(),
                rows,
            )),
            slots: Mutex::new(None),
            store,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a changed bucket (called with the ledger locked, so writes of one
    /// persona stay in order) and forgets stored buckets older than a day.
    fn persist(&self, ledger: &Ledger, changed: Option<Changed>) {
        let (Some(store), Some((key, tokens))) = (&self.store, changed) else {
            return;
        };
        let before = ledger.day_ago_key(Instant::now());
        if let Err(e) = store.llm_budget_save(&self.persona, key, tokens, before) {
            tracing::error!(persona = %self.persona, error = %e, "llm budget could not be saved");
        }
    }

    /// The persona's semaphore, new if the configured size changed.
    fn semaphore(&self, size: u32) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match &*slots {
            Some((n, sem)) if *n == size => sem.clone(),
            _ => {
                let sem = Arc::new(Semaphore::new(size as usize));
                *slots = Some((size, sem.clone()));
                sem
            }
        }
    }
}

/// The host's LLM providers and every persona's budget. Build one at start-up.
///
/// ```
/// use std::sync::Arc;
/// use roost::llm::{LlmConfig, LlmHub, PersonaLlmConfig, ProviderConfig, ProviderKind};
/// use roost::llm::fake::FakeLlm;
/// use roost::plugin::bindings::llm::{Request, Role, Turn};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let fake = FakeLlm::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
/// let mut cfg = LlmConfig::default();
/// cfg.providers.insert("fake".into(), fake.provider_config(ProviderKind::Anthropic, "fake-model"));
/// let hub = LlmHub::from_config(&cfg).unwrap();
///
/// assert!(hub.backend_for("mute", &PersonaLlmConfig::default()).is_none(), "deny by default");
/// let backend = hub.backend_for("sage", &PersonaLlmConfig::allowed()).unwrap();
/// let answer = backend
///     .complete(Request {
///         turns: vec![
///             Turn { role: Role::System, content: "You are terse.".into() },
///             Turn { role: Role::User, content: "what is a roost?".into() },
///         ],
///         max_tokens: Some(64),
///         temperature: None,
///         model: None,
///     })
///     .await
///     .unwrap();
/// assert!(answer.text.contains("what is a roost?"));
/// assert_eq!(hub.budget_usage("sage").unwrap().last_hour, u64::from(answer.usage.input_tokens + answer.usage.output_tokens));
/// # });
/// ```
pub struct LlmHub {
    providers: BTreeMap<String, ProviderEntry>,
    default_provider: Option<String>,
    secrets: SecretSet,
    personas: Mutex<HashMap<String, Arc<PersonaShared>>>,
    /// Where budgets persist; `None`: in memory only.
    store: Option<Store>,
}

impl LlmHub {
    /// A hub without providers (every allowed persona fails [`backend`](Self::backend)).
    pub fn new() -> Self {
        LlmHub {
            providers: BTreeMap::new(),
            default_provider: None,
            secrets: SecretSet::default(),
            personas: Mutex::new(HashMap::new()),
            store: None,
        }
    }

    /// Keeps every persona's budget in `store` (restored when its first backend is
    /// made), so a restart does not refill budgets. Without it budgets live in memory.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Validates `cfg`, reads every provider's key (environment or file) and builds
    /// the providers.
    pub fn from_config(cfg: &LlmConfig) -> Result<Self, LlmSetupError> {
        cfg.validate()?;
        let mut hub = LlmHub::new();
        let mut keys = Vec::new();
        for (name, pc) in &cfg.providers {
            let key_err = |source| LlmSetupError::Key {
                provider: name.clone(),
                source,
            };
            let key = match pc.key_source().map_err(key_err)? {
                Some(src) => Some(src.load().map_err(key_err)?),
                None => None,
            };
            let base_url = pc.base_url().map_err(|reason| LlmSetupError::Provider {
                provider: name.clone(),
                field: "base_url",
                reason,
            })?;
            if key.is_some() && base_url.scheme() == "http" && !is_loopback(&base_url) {
                tracing::warn!(provider = %name, url = %base_url, "API key will be sent over plain http");
            }
            if key.is_none() && pc.base_url.is_none() {
                tracing::warn!(provider = %name, "no api_key_env or api_key_file for the public API");
            }
            keys.extend(key.iter().cloned());
            let settings = HttpSettings {
                base_url,
                api_key: key,
                default_model: pc.default_model.clone(),
                retry: pc.retry_policy(),
            };
            let client_err = |source| LlmSetupError::Client {
                provider: name.clone(),
                source,
            };
            let provider: Arc<dyn Provider> = match pc.kind {
                ProviderKind::OpenAi => Arc::new(
                    OpenAiProvider::new(settings)
                        .map_err(client_err)?
                        .with_max_tokens_param(pc.max_tokens_param),
                ),
                ProviderKind::Anthropic => {
                    Arc::new(AnthropicProvider::new(settings).map_err(client_err)?)
                }
            };
            hub.add_provider(name, provider, Duration::from_millis(pc.timeout_ms));
        }
        hub.default_provider = cfg.resolve_provider(None).map(str::to_string);
        hub.secrets = SecretSet::new(keys);
        Ok(hub)
    }

    /// Adds (or replaces) a provider under `name`; `timeout` is the default bound on a
    /// call for personas that set none. For tests and embedders with their own provider.
    pub fn add_provider(&mut self, name: &str, provider: Arc<dyn Provider>, timeout: Duration) {
        self.providers
            .insert(name.to_string(), ProviderEntry { provider, timeout });
        if self.providers.len() == 1 {
            self.default_provider = Some(name.to_string());
        } else if self
            .default_provider
            .as_deref()
            .is_some_and(|d| !self.providers.contains_key(d))
        {
            self.default_provider = None;
        }
    }

    /// Every API key the hub holds, for the outbound secret scanner.
    pub fn known_secrets(&self) -> Vec<SecretString> {
        self.secrets.to_vec()
    }

    /// Forgets what this hub holds in memory for `persona` (its budgets, its slots):
    /// with a shared store its bot moved to another host, which spends from the same
    /// stored budget, so if it comes back the budget is read from the store again.
    /// Backends made before keep what they share.
    pub fn forget(&self, persona: &str) {
        self.personas().remove(persona);
    }

    /// Tokens charged to `persona` in the current windows; `None` before its first
    /// backend.
    pub fn budget_usage(&self, persona: &str) -> Option<BudgetUsage> {
        let shared = self.personas().get(persona).cloned()?;
        let usage = shared.ledger().usage(Instant::now());
        Some(usage)
    }

    /// The backend for `persona` under `cfg`: `Ok(None)` when not allowed, an error
    /// when the grant names a provider the hub does not have. Call it at start-up (and
    /// on reload) so misconfiguration fails loudly.
    pub fn backend(
        &self,
        persona: &str,
        cfg: &PersonaLlmConfig,
    ) -> Result<Option<Arc<dyn LlmBackend>>, LlmSetupError> {
        if !cfg.allow {
            return Ok(None);
        }
        let bad = |field: &'static str, reason: String| LlmSetupError::Persona {
            persona: persona.to_string(),
            field,
            reason,
        };
        let name = match cfg.provider.as_deref().or(self.default_provider.as_deref()) {
            Some(n) => n,
            None if self.providers.is_empty() => {
                return Err(bad(
                    "allow",
                    "no provider is configured: add [llm.providers.NAME]".into(),
                ));
            }
            None => {
                return Err(bad(
                    "provider",
                    "several providers are configured and no llm.default_provider: name one".into(),
                ));
            }
        };
        let entry = self
            .providers
            .get(name)
            .ok_or_else(|| {
                bad(
                    "provider",
                    format!("no provider named {name:?} in [llm.providers]"),
                )
            })?
            .clone();
        if cfg.max_concurrency == 0 {
            return Err(bad("max_concurrency", "must be at least 1".into()));
        }
        if cfg.max_tokens == 0 {
            return Err(bad("max_tokens", "must be at least 1".into()));
        }
        let shared = self
            .personas()
            .entry(persona.to_string())
            .or_insert_with(|| Arc::new(PersonaShared::new(persona, self.store.clone())))
            .clone();
        let model = cfg
            .model
            .clone()
            .unwrap_or_else(|| entry.provider.default_model().to_string());
        let backend = PersonaLlm {
            persona: persona.to_string(),
            provider_name: name.to_string(),
            provider: entry.provider,
            timeout: cfg
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(entry.timeout),
            allowed_models: cfg
                .models
                .iter()
                .filter(|m| **m != model)
                .cloned()
                .collect(),
            model,
            max_tokens: cfg.max_tokens,
            tokens_per_hour: cfg.tokens_per_hour,
            tokens_per_day: cfg.tokens_per_day,
            slots: shared.semaphore(cfg.max_concurrency),
            shared,
            secrets: self.secrets.clone(),
        };
        Ok(Some(Arc::new(backend)))
    }

    /// [`backend`](Self::backend), with a configuration error logged and treated as not
    /// granted.
    pub fn backend_for(
        &self,
        persona: &str,
        cfg: &PersonaLlmConfig,
    ) -> Option<Arc<dyn LlmBackend>> {
        match self.backend(persona, cfg) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(persona, error = %e, "llm not granted: configuration error");
                None
            }
        }
    }

    fn personas(&self) -> MutexGuard<'_, HashMap<String, Arc<PersonaShared>>> {
        self.personas.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for LlmHub {
    fn default() -> Self {
        LlmHub::new()
    }
}

impl fmt::Debug for LlmHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let providers: BTreeMap<&str, &dyn Provider> = self
            .providers
            .iter()
            .map(|(n, e)| (n.as_str(), e.provider.as_ref()))
            .collect();
        f.debug_struct("LlmHub")
            .field("providers", &providers)
            .field("default_provider", &self.default_provider)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// One persona's view of its provider, with its grant applied.
struct PersonaLlm {
    persona: String,
    provider_name: String,
    provider: Arc<dyn Provider>,
    /// The persona's model (its `model`, or the provider's default).
    model: String,
    /// Other models a hint may pick.
    allowed_models: Vec<String>,
    timeout: Duration,
    max_tokens: u32,
    tokens_per_hour: u64,
    tokens_per_day: u64,
    slots: Arc<Semaphore>,
    shared: Arc<PersonaShared>,
    secrets: SecretSet,
}

impl fmt::Debug for PersonaLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersonaLlm")
            .field("persona", &self.persona)
            .field("provider", &self.provider_name)
            .field("model", &self.model)
            .field("allowed_models", &self.allowed_models)
            .field("timeout", &self.timeout)
            .field("max_tokens", &self.max_tokens)
            .field("tokens_per_hour", &self.tokens_per_hour)
            .field("tokens_per_day", &self.tokens_per_day)
            .finish_non_exhaustive()
    }
}

/// The persona's request as a provider request; `invalid-request` reasons otherwise.
fn normalise(req: llm::Request) -> Result<ChatRequest, String> {
    if req.turns.is_empty() {
        return Err("the request has no turns".into());
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns = Vec::with_capacity(req.turns.len());
    for turn in req.turns {
        match turn.role {
            llm::Role::System => {
                if !turn.content.trim().is_empty() {
                    system.push(turn.content);
                }
            }
            llm::Role::User => turns.push((Role::User, turn.content)),
            llm::Role::Assistant => turns.push((Role::Assistant, turn.content)),
        }
    }
    if turns.iter().all(|(_, c)| c.trim().is_empty()) {
        return Err("the request has no user or assistant turn with text".into());
    }
    if let Some(t) = req.temperature
        && !(t.is_finite() && (0.0..=2.0).contains(&t))
    {
        return Err(format!("temperature {t} is outside 0.0-2.0"));
    }
    if req.max_tokens == Some(0) {
        return Err("max-tokens must be at least 1".into());
    }
    Ok(ChatRequest {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        turns,
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        model: req.model,
    })
}

/// The persona-facing error for a provider failure (details stay in the host's log).
fn persona_error(e: &ProviderError) -> llm::Error {
    match e {
        ProviderError::Timeout => llm::Error::Timeout,
        ProviderError::RateLimited { .. } => llm::Error::RateLimited,
        ProviderError::Server { status, .. } => {
            llm::Error::Provider(format!("the provider failed (HTTP {status})"))
        }
        ProviderError::Network(_) => llm::Error::Provider("the provider is unreachable".into()),
        ProviderError::Decode(_) => {
            llm::Error::Provider("the provider's answer was unreadable".into())
        }
        ProviderError::Auth { status, .. } => llm::Error::Provider(format!(
            "the provider refused the host's credentials (HTTP {status})"
        )),
        ProviderError::BadRequest {
            status: status @ (400 | 413 | 422),
            ..
        } => {
            llm::Error::InvalidRequest(format!("the provider refused the request (HTTP {status})"))
        }
        ProviderError::BadRequest { status, .. } => {
            llm::Error::Provider(format!("the provider refused the request (HTTP {status})"))
        }
    }
}

impl PersonaLlm {
    fn refused(&self, refusal: Refusal) -> llm::Error {
        tracing::info!(persona = %self.persona, %refusal, "llm call refused");
        match refusal {
            // Waiting would not help: the request itself is too large.
            Refusal::TooLarge { .. } => llm::Error::InvalidRequest(refusal.to_string()),
            Refusal::Spent { .. } => llm::Error::BudgetExhausted(refusal.to_string()),
        }
    }

    /// Whether a call with this input bound could start now (before waiting for a
    /// slot): its input and at least one output token must fit.
    fn check_budget(&self, input: u64) -> Result<(), llm::Error> {
        self.shared
            .ledger()
            .check(
                Instant::now(),
                self.tokens_per_hour,
                self.tokens_per_day,
                input.saturating_add(1),
            )
            .map_err(|refusal| self.refused(refusal))
    }

    /// Reserves the input bound and up to `max_output` tokens (cut to what is left).
    fn reserve(&self, input: u64, max_output: u64) -> Result<Reservation, llm::Error> {
        let mut ledger = self.shared.ledger();
        let (reservation, changed) = ledger
            .reserve(
                Instant::now(),
                self.tokens_per_hour,
                self.tokens_per_day,
                input,
                max_output,
            )
            .map_err(|refusal| self.refused(refusal))?;
        self.shared.persist(&ledger, changed);
        Ok(reservation)
    }

    /// Replaces a reservation by the call's real cost.
    fn reconcile(&self, reservation: Reservation, actual: u64) {
        let mut ledger = self.shared.ledger();
        let changed = ledger.reconcile(Instant::now(), reservation, actual);
        self.shared.persist(&ledger, changed);
    }

    async fn run(&self, req: llm::Request) -> Result<llm::Completion, llm::Error> {
        let started = Instant::now();
        let mut chat = normalise(req).map_err(llm::Error::InvalidRequest)?;
        chat.model = Some(match chat.model.take() {
            Some(hint) if hint == self.model || self.allowed_models.contains(&hint) => hint,
            Some(hint) => {
                tracing::debug!(persona = %self.persona, hint = %hint, model = %self.model, "model hint not allowed; using the persona's model");
                self.model.clone()
            }
            None => self.model.clone(),
        });
        let max_output = chat
            .max_tokens
            .map_or(self.max_tokens, |n| n.min(self.max_tokens));
        let input_bound = chat.input_token_bound();
        self.check_budget(input_bound)?;

        let deadline = started + self.timeout;
        enum Fail {
            Budget(llm::Error),
            Provider(ProviderError),
        }
        // Settled below; if this future is dropped mid-call (the persona's wall limit
        // stopped it), the guard settles it at the input bound, as for a timeout: the
        // provider may have processed the call, but the output reserved for it was
        // never received.
        let reserved = Unsettled {
            llm: self,
            reservation: Mutex::new(None),
            cost_if_dropped: input_bound,
        };
        let call = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| Fail::Provider(ProviderError::Timeout))?;
            // Reservations of calls that held the slot before this one count now.
            let reservation = self
                .reserve(input_bound, u64::from(max_output))
                .map_err(Fail::Budget)?;
            reserved.set(reservation);
            let mut chat = chat;
            chat.max_tokens = Some(u32::try_from(reservation.max_output).unwrap_or(max_output));
            self.provider.chat(chat).await.map_err(Fail::Provider)
        };
        let outcome = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(Fail::Budget(refused))) => return Err(refused),
            Ok(Err(Fail::Provider(e))) => Err(e),
            Err(_) => Err(ProviderError::Timeout),
        };
        let reservation = reserved.take();
        let resp = match outcome {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(r) = reservation {
                    // A call that timed out may have been processed: its input counts.
                    let cost = if e == ProviderError::Timeout {
                        input_bound
                    } else {
                        0
                    };
                    self.reconcile(r, cost);
                }
                tracing::warn!(persona = %self.persona, provider = %self.provider_name, error = %e, elapsed = ?started.elapsed(), "llm call failed");
                return Err(redact_error(persona_error(&e), &self.secrets));
            }
        };

        let estimated = resp.usage.is_none();
        let usage = resp.usage.unwrap_or_else(|| {
            let max_out = reservation.map_or(u64::from(max_output), |r| r.max_output);
            Usage {
                input: u32::try_from(input_bound).unwrap_or(u32::MAX),
                output: u32::try_from(token_bound(&resp.text).min(max_out)).unwrap_or(u32::MAX),
            }
        });
        if let Some(r) = reservation {
            self.reconcile(r, usage.total());
        }
        tracing::info!(
            persona = %self.persona,
            provider = %self.provider_name,
            model = %resp.model,
            input_tokens = usage.input,
            output_tokens = usage.output,
            estimated,
            elapsed = ?started.elapsed(),
            "llm call"
        );
        let mut model: String = self.secrets.redact(&resp.model).into_owned();
        if model.chars().count() > MAX_MODEL_NAME {
            model = model.chars().take(MAX_MODEL_NAME).collect();
        }
        Ok(llm::Completion {
            text: self.secrets.redact(&resp.text).into_owned(),
            model,
            usage: llm::Usage {
                input_tokens: usage.input,
                output_tokens: usage.output,
            },
        })
    }
}

/// A reservation not reconciled yet; reconciled at `cost_if_dropped` when dropped
/// still holding it.
struct Unsettled<'a> {
    llm: &'a PersonaLlm,
    reservation: Mutex<Option<Reservation>>,
    cost_if_dropped: u64,
}

impl Unsettled<'_> {
    fn set(&self, r: Reservation) {
        *self.reservation.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    fn take(&self) -> Option<Reservation> {
        self.reservation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.take() {
            self.llm.reconcile(r, self.cost_if_dropped);
        }
    }
}

fn redact_error(e: llm::Error, secrets: &SecretSet) -> llm::Error {
    match e {
        llm::Error::Provider(r) => llm::Error::Provider(secrets.redact(&r).into_owned()),
        llm::Error::InvalidRequest(r) => {
            llm::Error::InvalidRequest(secrets.redact(&r).into_owned())
        }
        other => other,
    }
}

impl LlmBackend for PersonaLlm {
    fn complete(&self, req: llm::Request) -> BoxFuture<'_, Result<llm::Completion, llm::Error>> {
        Box::pin(self.run(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::provider::ChatResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers after `delay` with fixed usage; counts calls and peak concurrency.
    #[derive(Debug, Default)]
    struct Scripted {
        delay: Duration,
        usage: Option<Usage>,
        calls: AtomicUsize,
        in_flight: AtomicUsize,
        peak: AtomicUsize,
        seen: Mutex<Vec<ChatRequest>>,
        /// Report the worst a tokenizer could: a token per input byte, and output
        /// up to the request's `max_tokens`.
        greedy: bool,
    }

    impl Provider for Scripted {
        fn default_model(&self) -> &str {
            "base"
        }
        fn chat(&self, req: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                let model = req.model.clone().unwrap_or_default();
                let usage = if self.greedy {
                    let input = req.system.iter().map(String::len).sum::<usize>()
                        + req.turns.iter().map(|(_, t)| t.len()).sum::<usize>();
                    Some(Usage {
                        input: input as u32,
                        output: req.max_tokens.unwrap_or(0),
                    })
                } else {
                    self.usage
                };
                self.seen.lock().unwrap().push(req);
                Ok(ChatResponse {
                    text: "12345678".into(),
                    model,
                    usage,
                })
            })
        }
    }

    fn hub(p: Arc<Scripted>) -> LlmHub {
        let mut hub = LlmHub::new();
        hub.add_provider("s", p, Duration::from_secs(30));
        hub
    }

    fn ask(text: &str) -> llm::Request {
        llm::Request {
            turns: vec![llm::Turn {
                role: llm::Role::User,
                content: text.into(),
            }],
            max_tokens: None,
            temperature: None,
            model: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hourly_budget_refuses_then_refills() {
        let p = Arc::new(Scripted {
            usage: Some(Usage {
                input: 30,
                output: 20,
            }),
            ..Default::default()
        });
        let hub = hub(p.clone());
        let cfg = PersonaLlmConfig {
            tokens_per_hour: 100,
            ..PersonaLlmConfig::allowed()
        };
        let b = hub.backend_for("p", &cfg).unwrap();
        b.complete(ask("hi")).await.unwrap();
        b.complete(ask("hi")).await.unwrap();
        let err = b.complete(ask("hi")).await.unwrap_err();
        let llm::Error::BudgetExhausted(why) = err else {
            panic!("{err:?}")
        };
        assert_eq!(why, "hourly budget of 100 tokens spent; refills in 60 min");
        assert_eq!(
            p.calls.load(Ordering::SeqCst),
            2,
            "refused before the provider"
        );
        // A new backend for the same persona (a reload) shares the budget.
        let again = hub.backend_for("p", &cfg).unwrap();
        assert!(matches!(
            again.complete(ask("hi")).await,
            Err(llm::Error::BudgetExhausted(_))
        ));
        tokio::time::advance(HOUR_AND_A_BIT).await;
        again.complete(ask("hi")).await.unwrap();
        assert_eq!(
            hub.budget_usage("p").unwrap(),
            BudgetUsage {
                last_hour: 50,
                last_day: 150
            }
        );
    }

    const HOUR_AND_A_BIT: Duration = Duration::from_secs(3601);

    #[tokio::test(start_paused = true)]
    async fn slots_cap_concurrency_and_timeout_covers_the_wait() {
        let p = Arc::new(Scripted {
            delay: Duration::from_secs(10),
            ..Default::default()
        });
        let hub = hub(p.clone());
        let cfg = PersonaLlmConfig {
            max_concurrency: 2,
            timeout_ms: Some(25_000),
            ..PersonaLlmConfig::allowed()
        };
        let b = hub.backend_for("p", &cfg).unwrap();
        let calls: Vec<_> = (0..5).map(|_| b.complete(ask("hello"))).collect();
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(p.peak.load(Ordering::SeqCst), 2);
        // Two rounds of two fit in 25 s; the fifth call would end at 30 s.
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
        assert!(matches!(results[4], Err(llm::Error::Timeout)));
        // Usage was estimated by its bounds: "hello" is 5 bytes and one turn (5 + 4 +
        // 3 tokens), 8 bytes out are 8 tokens.
        let ok = results[0].as_ref().unwrap();
        assert_eq!((ok.usage.input_tokens, ok.usage.output_tokens), (12, 8));
        // The fifth call got its slot at 20 s and timed out at 25 s: its reservation
        // became its input bound (it may have been processed); the others, their use.
        assert_eq!(hub.budget_usage("p").unwrap().last_hour, 4 * 20 + 12);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_call_is_charged_its_input_not_its_reservation() {
        let p = Arc::new(Scripted {
            delay: Duration::from_secs(10),
            ..Default::default()
        });
        let hub = hub(p.clone());
        let cfg = PersonaLlmConfig {
            max_tokens: 500,
            ..PersonaLlmConfig::allowed()
        };
        let b = hub.backend_for("p", &cfg).unwrap();
        // The persona is stopped (its wall limit) while the provider is still working:
        // the call's future is dropped.
        let abandoned =
            tokio::time::timeout(Duration::from_secs(2), b.complete(ask("hello"))).await;
        assert!(abandoned.is_err());
        assert_eq!(p.calls.load(Ordering::SeqCst), 1);
        // "hello" is 12 tokens of input bound; the 500 output tokens reserved for it
        // are given back.
        assert_eq!(hub.budget_usage("p").unwrap().last_hour, 12);
    }

    #[tokio::test(start_paused = true)]
    async fn cjk_and_emoji_calls_cannot_overspend_even_concurrently() {
        let p = Arc::new(Scripted {
            delay: Duration::from_secs(1),
            greedy: true,
            ..Default::default()
        });
        let hub = hub(p.clone());
        let cfg = PersonaLlmConfig {
            tokens_per_hour: 1000,
            max_concurrency: 4,
            ..PersonaLlmConfig::allowed()
        };
        let b = hub.backend_for("p", &cfg).unwrap();
        // 100 CJK characters (300 bytes; characters / 4 would guess 25 tokens), and
        // emoji (a family: 25 bytes, 1 character on screen).
        let cjk = "東京の天気はどうですか".repeat(10);
        let emoji = "👨‍👩‍👧‍👦".repeat(12);
        let calls: Vec<_> = (0..6)
            .map(|i| b.complete(ask(if i % 2 == 0 { &cjk } else { &emoji })))
            .collect();
        let results = futures_util::future::join_all(calls).await;
        let spent: u64 = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|c| u64::from(c.usage.input_tokens + c.usage.output_tokens))
            .sum();
        assert!(results.iter().any(|r| r.is_ok()));
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(llm::Error::BudgetExhausted(_)))),
            "{results:?}"
        );
        assert!(
            spent <= 1000,
            "the provider billed {spent} tokens of a 1000 budget"
        );
        assert_eq!(hub.budget_usage("p").unwrap().last_hour, spent);
        // Every request's max_tokens was cut to what the budget left.
        for r in p.seen.lock().unwrap().iter() {
            assert!(u64::from(r.max_tokens.unwrap()) < 1000);
        }
    }

    /// Two hosts on one store: the persona moves to the other host and back; the
    /// first host reads what the other spent instead of its own stale count.
    #[tokio::test(start_paused = true)]
    async fn a_persona_coming_back_reads_its_budget_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = Arc::new(Scripted {
            usage: Some(Usage {
                input: 30,
                output: 20,
            }),
            ..Default::default()
        });
        let cfg = PersonaLlmConfig {
            tokens_per_hour: 100,
            ..PersonaLlmConfig::allowed()
        };
        let here = hub(p.clone()).with_store(store.clone());
        let there = hub(p.clone()).with_store(store.clone());
        here.backend_for("p", &cfg)
            .unwrap()
            .complete(ask("hi"))
            .await
            .unwrap();
        // It moves: the other host spends the rest.
        here.forget("p");
        assert!(here.budget_usage("p").is_none());
        there
            .backend_for("p", &cfg)
            .unwrap()
            .complete(ask("hi"))
            .await
            .unwrap();
        // And back.
        there.forget("p");
        let b = here.backend_for("p", &cfg).unwrap();
        assert_eq!(here.budget_usage("p").unwrap().last_hour, 100);
        assert!(matches!(
            b.complete(ask("hi")).await,
            Err(llm::Error::BudgetExhausted(_))
        ));
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Scripted {
            usage: Some(Usage {
                input: 30,
                output: 20,
            }),
            ..Default::default()
        });
        let cfg = PersonaLlmConfig {
            tokens_per_hour: 100,
            ..PersonaLlmConfig::allowed()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let hub = hub(p.clone()).with_store(store);
            let b = hub.backend_for("p", &cfg).unwrap();
            b.complete(ask("hi")).await.unwrap();
            b.complete(ask("hi")).await.unwrap();
            assert!(matches!(
                b.complete(ask("hi")).await,
                Err(llm::Error::BudgetExhausted(_))
            ));
        }
        // A new process: a new store handle and a new hub.
        let store = Store::open(dir.path()).unwrap();
        let hub = hub(p.clone()).with_store(store.clone());
        let b = hub.backend_for("p", &cfg).unwrap();
        assert_eq!(
            hub.budget_usage("p").unwrap(),
            BudgetUsage {
                last_hour: 100,
                last_day: 100
            }
        );
        assert!(matches!(
            b.complete(ask("hi")).await,
            Err(llm::Error::BudgetExhausted(_))
        ));
        assert_eq!(p.calls.load(Ordering::SeqCst), 2);
        // Another persona's budget is its own.
        assert!(hub.budget_usage("q").is_none());
        tokio::time::advance(HOUR_AND_A_BIT).await;
        b.complete(ask("hi")).await.unwrap();
        assert_eq!(hub.budget_usage("p").unwrap().last_hour, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn models_and_caps_are_applied() {
        let p = Arc::new(Scripted::default());
        let hub = hub(p.clone());
        let cfg = PersonaLlmConfig {
            models: vec!["big".into()],
            max_tokens: 100,
            ..PersonaLlmConfig::allowed()
        };
        let b = hub.backend_for("p", &cfg).unwrap();
        for (hint, max) in [
            (Some("big"), Some(5000)),
            (Some("other"), Some(7)),
            (None, None),
        ] {
            let mut r = ask("x");
            r.model = hint.map(str::to_string);
            r.max_tokens = max;
            r.turns.insert(
                0,
                llm::Turn {
                    role: llm::Role::System,
                    content: "a".into(),
                },
            );
            r.turns.push(llm::Turn {
                role: llm::Role::System,
                content: "b".into(),
            });
            b.complete(r).await.unwrap();
        }
        let seen = p.seen.lock().unwrap();
        let got: Vec<_> = seen
            .iter()
            .map(|r| (r.model.as_deref().unwrap(), r.max_tokens.unwrap()))
            .collect();
        assert_eq!(got, [("big", 100), ("base", 7), ("base", 100)]);
        assert_eq!(seen[0].system.as_deref(), Some("a\n\nb"));
        assert_eq!(seen[0].turns, vec![(Role::User, "x".to_string())]);
    }

    #[tokio::test]
    async fn invalid_requests_and_grants() {
        let hub = hub(Arc::new(Scripted::default()));
        assert!(hub.backend_for("p", &PersonaLlmConfig::default()).is_none());
        let missing = PersonaLlmConfig {
            provider: Some("nope".into()),
            ..PersonaLlmConfig::allowed()
        };
        assert!(
            hub.backend("p", &missing)
                .err()
                .unwrap()
                .to_string()
                .starts_with("personas.p.llm.provider")
        );
        assert!(hub.backend_for("p", &missing).is_none());
        let b = hub.backend_for("p", &PersonaLlmConfig::allowed()).unwrap();
        let mut empty = ask("");
        empty.turns.clear();
        assert!(matches!(
            b.complete(empty).await,
            Err(llm::Error::InvalidRequest(_))
        ));
        let only_system = llm::Request {
            turns: vec![llm::Turn {
                role: llm::Role::System,
                content: "s".into(),
            }],
            ..ask("")
        };
        assert!(matches!(
            b.complete(only_system).await,
            Err(llm::Error::InvalidRequest(_))
        ));
        assert!(matches!(
            b.complete(ask("   ")).await,
            Err(llm::Error::InvalidRequest(_))
        ));
        let hot = llm::Request {
            temperature: Some(f32::NAN),
            ..ask("x")
        };
        assert!(matches!(
            b.complete(hot).await,
            Err(llm::Error::InvalidRequest(_))
        ));
        let zero = llm::Request {
            max_tokens: Some(0),
            ..ask("x")
        };
        assert!(matches!(
            b.complete(zero).await,
            Err(llm::Error::InvalidRequest(_))
        ));
        let huge = "x".repeat(400_000);
        let r = b.complete(ask(&huge)).await;
        assert!(
            matches!(r, Err(llm::Error::InvalidRequest(ref s)) if s.contains("exceeds the whole")),
            "{r:?}"
        );
    }

    #[test]
    fn provider_errors_map_to_short_persona_errors() {
        let e = |status| ProviderError::BadRequest {
            status,
            excerpt: "detail".into(),
        };
        assert!(matches!(
            persona_error(&e(400)),
            llm::Error::InvalidRequest(_)
        ));
        assert!(matches!(persona_error(&e(404)), llm::Error::Provider(_)));
        assert!(matches!(
            persona_error(&ProviderError::RateLimited { retry_after: None }),
            llm::Error::RateLimited
        ));
        let llm::Error::Provider(r) = persona_error(&ProviderError::Server {
            status: 502,
            excerpt: "secret detail".into(),
        }) else {
            panic!()
        };
        assert_eq!(r, "the provider failed (HTTP 502)");
    }
}
