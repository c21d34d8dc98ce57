//! One pass over a message that tells which rules could match it.
//!
//! The secret scanner and the injection detector each have dozens of regexes. Running
//! them one by one costs a scan of the text per regex (each with its own literal
//! prefilter), and most chat lines match none of them. A [`Prefilter`] is built once from
//! every rule's *gate*: groups of literals such that any match of the rule contains at
//! least one literal of every group (e.g. the `OVERRIDE` rule needs an override verb
//! *and* an override noun). One Aho-Corasick pass (overlapping, ASCII case-insensitive,
//! so a gate may use lower-case literals for case-sensitive rules) finds every literal
//! present; [`Candidates::may_match`] then says, per rule, whether its regex needs to run.
//! A rule whose gate says no cannot match, so skipping it changes no verdict.
//!
//! A combined `RegexSet` over the same rules measured 30 times slower than running the
//! regexes one by one (its lazy DFA thrashes on this many bounded repetitions); the
//! literal pass costs a few hundred nanoseconds for a 200-character line.
//!
//! Gates are written next to the rules they guard. Debug builds check them: the scanner
//! and the detector also run every rule without the prefilter and assert the same result
//! (see `secrets::scan_formats` and `injection::detect`), so the test suite catches a
//! gate that misses a literal.

use aho_corasick::automaton::Automaton;
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind};

/// A rule's gate: every group needs one of its literals in the text (ASCII
/// case-insensitive). No groups: the rule always runs.
pub(crate) type Gate = &'static [&'static [&'static str]];

/// Most groups over all rules of one prefilter.
const MAX_GROUPS: usize = 64 * WORDS;
const WORDS: usize = 8;

/// Literals of many rules' gates in one Aho-Corasick automaton.
#[derive(Debug)]
pub(crate) struct Prefilter {
    /// Walked by hand (every match state lists every literal ending there): an
    /// overlapping search through `AhoCorasick` costs several times as much per byte.
    dfa: DFA,
    /// Pattern id → the groups it satisfies (`group_of[starts[p]..starts[p + 1]]`).
    starts: Vec<u32>,
    group_of: Vec<u16>,
    /// Rule → its groups.
    rules: Vec<Vec<u16>>,
}

/// Which gate groups a text satisfies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidates {
    hit: [u64; WORDS],
    all: bool,
}

impl Candidates {
    /// Every rule may match (no prefiltering).
    pub(crate) const ALL: Candidates = Candidates {
        hit: [0; WORDS],
        all: true,
    };
}

impl Prefilter {
    /// A prefilter for `gates` (rule `i` is `gates[i]`), matching the literals ASCII
    /// case-insensitively or, for text that is lower-case already (a smaller automaton),
    /// exactly.
    pub(crate) fn new(gates: &[Gate], case_insensitive: bool) -> Self {
        let mut literals: Vec<String> = Vec::new();
        let mut groups_by_literal: Vec<Vec<u16>> = Vec::new();
        let mut rules = Vec::with_capacity(gates.len());
        let mut next_group = 0usize;
        for gate in gates {
            let mut ids = Vec::with_capacity(gate.len());
            for group in gate.iter() {
                assert!(next_group < MAX_GROUPS, "too many prefilter groups");
                assert!(!group.is_empty(), "empty prefilter group");
                let g = next_group as u16;
                next_group += 1;
                ids.push(g);
                for lit in group.iter() {
                    assert!(!lit.is_empty(), "empty prefilter literal");
                    let lit = lit.to_ascii_lowercase();
                    match literals.iter().position(|l| *l == lit) {
                        Some(p) => groups_by_literal[p].push(g),
                        None => {
                            literals.push(lit);
                            groups_by_literal.push(vec![g]);
                        }
                    }
                }
            }
            rules.push(ids);
        }
        let dfa = DFA::builder()
            .ascii_case_insensitive(case_insensitive)
            .match_kind(MatchKind::Standard)
            .build(&literals)
            .expect("prefilter automaton");
        let mut starts = Vec::with_capacity(literals.len() + 1);
        let mut group_of = Vec::new();
        for groups in &groups_by_literal {
            starts.push(group_of.len() as u32);
            group_of.extend_from_slice(groups);
        }
        starts.push(group_of.len() as u32);
        Prefilter {
            dfa,
            starts,
            group_of,
            rules,
        }
    }

    /// The gate groups `text` satisfies.
    pub(crate) fn scan(&self, text: &str) -> Candidates {
        let mut hit = [0u64; WORDS];
        let dfa = &self.dfa;
        let Ok(mut sid) = dfa.start_state(Anchored::No) else {
            return Candidates::ALL;
        };
        for &b in text.as_bytes() {
            sid = dfa.next_state(Anchored::No, sid, b);
            if dfa.is_special(sid) {
                if dfa.is_dead(sid) {
                    break;
                }
                for i in 0..if dfa.is_match(sid) {
                    dfa.match_len(sid)
                } else {
                    0
                } {
                    let p = dfa.match_pattern(sid, i).as_usize();
                    for &g in &self.group_of[self.starts[p] as usize..self.starts[p + 1] as usize] {
                        hit[usize::from(g) / 64] |= 1 << (g % 64);
                    }
                }
            }
        }
        Candidates { hit, all: false }
    }

    /// Whether rule `rule` may match a text with these candidates.
    pub(crate) fn may_match(&self, c: &Candidates, rule: usize) -> bool {
        c.all
            || self.rules[rule]
                .iter()
                .all(|&g| c.hit[usize::from(g) / 64] & (1 << (g % 64)) != 0)
    }
}

/// Length of the longest run of characters that keys are made of (ASCII letters and
/// digits and `_ + / = . ~ -`). A rule that needs `[A-Za-z0-9_-]{32,}` cannot match a
/// text whose longest run is shorter than 32.
pub(crate) fn longest_key_run(text: &str) -> usize {
    text.as_bytes()
        .split(|&b| !KEY_CHAR[usize::from(b)])
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0)
}

/// The bytes [`longest_key_run`] counts.
static KEY_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'_' | b'+' | b'/' | b'=' | b'.' | b'~' | b'-');
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gates_need_every_group() {
        let p = Prefilter::new(
            &[
                &[&["ignore", "forget"], &["rules", "prompt"]],
                &[],
                &[&["SK-"]],
            ],
            true,
        );
        let c = p.scan("please IGNORE the Rules");
        assert!(p.may_match(&c, 0) && p.may_match(&c, 1) && !p.may_match(&c, 2));
        let c = p.scan("ignore me");
        assert!(!p.may_match(&c, 0) && p.may_match(&c, 1));
        let c = p.scan("an sk-proj key");
        assert!(p.may_match(&c, 2));
        assert!(p.may_match(&Candidates::ALL, 0));
        // Overlapping literals all count.
        let p = Prefilter::new(
            &[&[&["system prompt"]], &[&["prompt"]], &[&["system"]]],
            false,
        );
        let c = p.scan("your system prompt");
        assert!((0..3).all(|r| p.may_match(&c, r)));
    }

    #[test]
    fn key_runs() {
        assert_eq!(longest_key_run("hello there, friend"), 6);
        assert_eq!(longest_key_run("ghp_abc-def.ghi/jk=+~ x"), 21);
        assert_eq!(longest_key_run(""), 0);
        assert_eq!(longest_key_run("ａｂｃ"), 0);
    }
}
