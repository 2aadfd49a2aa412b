//! The promotion gate (`[promotion]`): whether a trained version replaces
//! the champion of its (ticker, interval).
//!
//! The trainer scores its version on its own test split (the latest
//! held-out window, beside the naive persistence forecast) and scores the
//! champion it found when the job started on the same window. The version
//! is promoted only when its error (`metric`) is below `(1 - margin)` times
//! naive's and, when there is a champion, below `(1 - margin)` times the
//! champion's. A champion whose checkpoint could not be scored does not
//! block (the comparison with naive decides, and the reason says so). If
//! the champion changed while the version trained (an operator promoted or
//! rolled back), the comparison is stale and the version is rejected. A
//! rejected version stays registered as `rejected`, with its metrics and
//! the reason.

use serde_json::{json, Value};
use tickmesh_core::config::PromotionConfig;

/// The gate's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub promoted: bool,
    /// Why, with the numbers compared.
    pub reason: String,
}

impl Decision {
    /// The metrics JSON with the verdict added under `gate`.
    pub fn annotate(&self, metrics_json: &str, cfg: &PromotionConfig) -> String {
        let mut v: Value = serde_json::from_str(metrics_json).unwrap_or_else(|_| json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "gate".into(),
                json!({
                    "promoted": self.promoted,
                    "reason": self.reason,
                    "metric": cfg.metric.as_str(),
                    "margin": cfg.margin,
                }),
            );
        }
        v.to_string()
    }
}

fn rejected(reason: String) -> Decision {
    Decision {
        promoted: false,
        reason,
    }
}

/// Decides on a version whose report carries `metrics_json`, when the
/// champion is `champion_now` (its version, if any).
pub fn decide(cfg: &PromotionConfig, metrics_json: &str, champion_now: Option<i64>) -> Decision {
    if !cfg.gate {
        return Decision {
            promoted: true,
            reason: "promotion.gate is off".into(),
        };
    }
    let v: Value = match serde_json::from_str(metrics_json) {
        Ok(v) => v,
        Err(e) => return rejected(format!("its metrics do not parse: {e}")),
    };
    let m = cfg.metric.as_str();
    let error_of = |x: &Value| x.get(m).and_then(Value::as_f64).filter(|e| e.is_finite());
    let (Some(ours), Some(naive)) = (error_of(&v["model"]), error_of(&v["naive"])) else {
        return rejected(format!(
            "its metrics lack a finite {m} for the model and the naive forecast"
        ));
    };
    let scored_against = v["champion"]["version"].as_i64();
    if scored_against != champion_now {
        let name = |c: Option<i64>| c.map_or("none".to_string(), |v| format!("v{v}"));
        return rejected(format!(
            "the champion changed while it trained (it was compared with {}, the champion is {} now); train it again",
            name(scored_against),
            name(champion_now)
        ));
    }
    let keep = 1.0 - cfg.margin;
    let mut parts = vec![format!("{m} {ours:.6}")];
    let mut failed = Vec::new();
    parts.push(format!("naive {naive:.6}"));
    if ours >= keep * naive {
        failed.push("naive");
    }
    if let Some(cv) = scored_against {
        match error_of(&v["champion"]["report"]["model"]) {
            Some(ce) => {
                parts.push(format!("champion v{cv} {ce:.6}"));
                if ours >= keep * ce {
                    failed.push("the champion");
                }
            }
            None => parts.push(format!(
                "champion v{cv} not scored ({})",
                v["champion"]["note"].as_str().unwrap_or("no metrics")
            )),
        }
    }
    let margin = if cfg.margin > 0.0 {
        format!(" by {:.1}%", cfg.margin * 100.0)
    } else {
        String::new()
    };
    let compared = parts.join(", ");
    if failed.is_empty() {
        Decision {
            promoted: true,
            reason: format!("beats every baseline{margin} on its test window: {compared}"),
        }
    } else {
        rejected(format!(
            "does not beat {}{margin} on its test window: {compared}",
            failed.join(" or ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickmesh_core::config::GateMetric;

    fn cfg(margin: f64) -> PromotionConfig {
        PromotionConfig {
            gate: true,
            metric: GateMetric::Rmse,
            margin,
        }
    }

    fn metrics(ours: f64, naive: f64, champion: Option<(i64, Option<f64>)>) -> String {
        let mut v = json!({ "model": { "rmse": ours, "mae": 1.0 }, "naive": { "rmse": naive, "mae": 1.0 } });
        if let Some((version, err)) = champion {
            v["champion"] = match err {
                Some(e) => json!({ "version": version, "report": { "model": { "rmse": e } } }),
                None => json!({ "version": version, "report": null, "note": "unreadable" }),
            };
        }
        v.to_string()
    }

    #[test]
    fn a_first_version_must_beat_naive() {
        assert!(decide(&cfg(0.0), &metrics(0.9, 1.0, None), None).promoted);
        let d = decide(&cfg(0.0), &metrics(1.0, 1.0, None), None);
        assert!(!d.promoted, "a tie is not a win");
        assert!(d.reason.contains("does not beat naive"), "{}", d.reason);
        // 5% margin: 0.96 is not 5% better than 1.0.
        let d = decide(&cfg(0.05), &metrics(0.96, 1.0, None), None);
        assert!(!d.promoted && d.reason.contains("by 5.0%"), "{}", d.reason);
        assert!(decide(&cfg(0.05), &metrics(0.94, 1.0, None), None).promoted);
    }

    #[test]
    fn a_challenger_must_beat_the_champion_on_the_same_window() {
        let d = decide(&cfg(0.0), &metrics(0.9, 1.0, Some((3, Some(0.8)))), Some(3));
        assert!(!d.promoted);
        assert!(
            d.reason.contains("does not beat the champion"),
            "{}",
            d.reason
        );
        assert!(d.reason.contains("champion v3 0.800000"), "{}", d.reason);
        assert!(decide(&cfg(0.0), &metrics(0.7, 1.0, Some((3, Some(0.8)))), Some(3)).promoted);
        let d = decide(&cfg(0.0), &metrics(1.1, 1.0, Some((3, Some(1.2)))), Some(3));
        assert!(
            !d.promoted && d.reason.contains("does not beat naive"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn an_unscorable_champion_leaves_naive_to_decide() {
        let d = decide(&cfg(0.0), &metrics(0.9, 1.0, Some((3, None))), Some(3));
        assert!(d.promoted, "{}", d.reason);
        assert!(d.reason.contains("not scored (unreadable)"), "{}", d.reason);
    }

    #[test]
    fn a_champion_that_changed_meanwhile_rejects() {
        let d = decide(&cfg(0.0), &metrics(0.1, 1.0, Some((3, Some(0.8)))), Some(4));
        assert!(!d.promoted);
        assert!(
            d.reason.contains("compared with v3, the champion is v4"),
            "{}",
            d.reason
        );
        let d = decide(&cfg(0.0), &metrics(0.1, 1.0, None), Some(4));
        assert!(d.reason.contains("compared with none"), "{}", d.reason);
    }

    #[test]
    fn the_metric_is_configurable_and_bad_metrics_reject() {
        let mut c = cfg(0.0);
        c.metric = GateMetric::Mae;
        // mae 1.0 vs naive 1.0: a tie, though rmse would win.
        assert!(!decide(&c, &metrics(0.5, 1.0, None), None).promoted);
        assert!(!decide(&cfg(0.0), "not json", None).promoted);
        assert!(!decide(&cfg(0.0), &metrics(f64::NAN, 1.0, None), None).promoted);
        let off = PromotionConfig {
            gate: false,
            ..cfg(0.0)
        };
        assert!(decide(&off, &metrics(9.0, 1.0, None), None).promoted);
    }

    #[test]
    fn the_verdict_is_recorded_with_the_metrics() {
        let d = decide(&cfg(0.0), &metrics(1.1, 1.0, None), None);
        let v: Value =
            serde_json::from_str(&d.annotate(&metrics(1.1, 1.0, None), &cfg(0.0))).unwrap();
        assert_eq!(v["gate"]["promoted"], false);
        assert_eq!(v["gate"]["metric"], "rmse");
        assert_eq!(v["model"]["rmse"], 1.1);
    }
}
