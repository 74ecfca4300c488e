//! `CDC_LAKE__SECTION__KEY` environment overrides, applied to the parsed TOML before it is
//! typed.

use super::{ConfigError, ENV_PREFIX};

/// `CDC_LAKE__KAFKA__BROKERS=x` sets `kafka.brokers`. Values parse as TOML (numbers, booleans,
/// arrays) and fall back to strings.
pub(super) fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    // Shallower paths first, so `CDC_LAKE__TARGETS={}` replaces the section and then
    // `CDC_LAKE__TARGETS__X__SCHEMA` fills it, whatever order the environment lists them in.
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(var, _)| var.starts_with(ENV_PREFIX))
        .collect();
    env.sort_by_key(|(var, _)| var.matches("__").count());
    for (var, raw) in env {
        let Some(path) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                reason: "empty path segment".into(),
            });
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let mut cur = &mut *table;
        for k in &keys[..keys.len() - 1] {
            let entry = cur
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            cur = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                reason: format!("{k} is not a section"),
            })?;
        }
        cur.insert(keys[keys.len() - 1].clone(), value);
    }
    Ok(())
}
