//! Default-deny policy: which connectors may serve a service, which agents may reach it.
//!
//! Patterns are globs over SPIFFE IDs: `*` matches any run of characters (also `/`), `?` one
//! character, everything else itself. No rule for a service means nobody may serve or reach it.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub service: String,
    /// SPIFFE ID patterns of connectors allowed to register the service.
    #[serde(default)]
    pub connectors: Vec<String>,
    /// SPIFFE ID patterns of agents allowed to open flows to it.
    #[serde(default)]
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<PolicyRule>,
}

/// Glob match with `*` and `?`, iterative with single backtracking point (linear in practice,
/// no recursion a hostile pattern could blow up).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl Policy {
    pub fn new(rules: Vec<PolicyRule>) -> Policy {
        Policy { rules }
    }

    pub fn rules(&self) -> &[PolicyRule] {
        &self.rules
    }

    /// May the connector with this SPIFFE ID register `service`?
    pub fn may_serve(&self, service: &str, connector: &str) -> bool {
        self.rules
            .iter()
            .filter(|r| r.service == service)
            .any(|r| r.connectors.iter().any(|p| glob_match(p, connector)))
    }

    /// May the agent with this SPIFFE ID open flows to `service`?
    pub fn may_reach(&self, service: &str, agent: &str) -> bool {
        self.rules
            .iter()
            .filter(|r| r.service == service)
            .any(|r| r.agents.iter().any(|p| glob_match(p, agent)))
    }

    /// Checks patterns for mistakes an operator would want to hear about at startup.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.service.is_empty() {
                return Err(format!("policy[{i}]: service must not be empty"));
            }
            for p in r.connectors.iter().chain(&r.agents) {
                if !p.starts_with("spiffe://") && p != "*" {
                    return Err(format!(
                        "policy[{i}] (service {:?}): pattern {p:?} must start with spiffe://",
                        r.service
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "spiffe://corp.example/agent/*",
            "spiffe://corp.example/agent/alice"
        ));
        assert!(!glob_match(
            "spiffe://corp.example/agent/*",
            "spiffe://corp.example/connector/x"
        ));
        assert!(glob_match(
            "spiffe://corp.example/connector/web-*",
            "spiffe://corp.example/connector/web-1"
        ));
        assert!(!glob_match(
            "spiffe://corp.example/connector/web-*",
            "spiffe://corp.example/connector/db-1"
        ));
        assert!(glob_match("spiffe://*/agent/a?", "spiffe://x.y/agent/ab"));
        assert!(!glob_match("spiffe://*/agent/a?", "spiffe://x.y/agent/abc"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match(
            "spiffe://corp.example/agent/alice",
            "spiffe://corp.example/agent/alice2"
        ));
        // A pathological pattern is decided without exponential backtracking.
        let text = format!("{}b", "a".repeat(10_000));
        assert!(!glob_match(&"*a".repeat(50), &text));
        assert!(glob_match(&"*a".repeat(50), &"a".repeat(10_000)));
    }

    #[test]
    fn default_deny() {
        let p = Policy::new(vec![PolicyRule {
            service: "web".into(),
            connectors: vec!["spiffe://corp.example/connector/web-*".into()],
            agents: vec!["spiffe://corp.example/agent/*".into()],
        }]);
        assert!(p.may_reach("web", "spiffe://corp.example/agent/alice"));
        assert!(!p.may_reach("db", "spiffe://corp.example/agent/alice"));
        assert!(!p.may_reach("web", "spiffe://other.example/agent/alice"));
        assert!(p.may_serve("web", "spiffe://corp.example/connector/web-1"));
        assert!(!p.may_serve("web", "spiffe://corp.example/agent/alice"));
        assert!(!Policy::default().may_reach("web", "spiffe://corp.example/agent/alice"));
    }

    #[test]
    fn validate_patterns() {
        let bad = Policy::new(vec![PolicyRule {
            service: "web".into(),
            connectors: vec!["corp.example/connector/*".into()],
            agents: vec![],
        }]);
        assert!(bad.validate().unwrap_err().contains("spiffe://"));
    }
}
