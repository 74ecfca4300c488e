//! A filter's condition: operators over a change's fields, combined with `and`/`or`/`not` to
//! any depth, parsed from YAML and evaluated with SQL's three-valued logic (a comparison with a
//! null is unknown, and only a condition that is true routes the change), so that a filter
//! means the same here as in the Flink SQL `routes sql` prints.

use std::cmp::Ordering;

use regex::Regex;
use serde_yaml::Value as Yaml;

use super::operand::{self, Literal, Operand, TypeMismatch};
use crate::envelope::value::{self, UNAVAILABLE_VALUE};
use crate::envelope::{ChangeEvent, ColumnType, ValueForm};

/// Where a condition reads its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    After(String),
    Before(String),
    /// The operation code: `c`, `u`, `d`, `r` or `t`.
    Op,
    /// A field of Debezium's `source` block (`db`, `schema`, `table`, `lsn`, `ts_ms`, …).
    Source(String),
    /// The source table as `schema.table`.
    Table,
}

impl Field {
    fn parse(s: &str) -> Result<Field, String> {
        let column = |rest: &str| {
            if rest.is_empty() {
                Err(format!("field {s:?} names no column"))
            } else {
                Ok(rest.to_string())
            }
        };
        match s.split_once('.') {
            _ if s == "op" => Ok(Field::Op),
            _ if s == "table" => Ok(Field::Table),
            Some(("after", rest)) => Ok(Field::After(column(rest)?)),
            Some(("before", rest)) => Ok(Field::Before(column(rest)?)),
            Some(("source", rest)) => Ok(Field::Source(column(rest)?)),
            _ => Err(format!(
                "unknown field {s:?}: expected after.<column>, before.<column>, op, table or source.<field>"
            )),
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::After(c) => write!(f, "after.{c}"),
            Field::Before(c) => write!(f, "before.{c}"),
            Field::Op => f.write_str("op"),
            Field::Source(s) => write!(f, "source.{s}"),
            Field::Table => f.write_str("table"),
        }
    }
}

/// One operator applied to a field.
#[derive(Debug, Clone)]
pub enum Test {
    Equals(Literal),
    In(Vec<Literal>),
    NotIn(Vec<Literal>),
    /// `greaterThan`, … : true when the field's order against the literal is one of these.
    Compare(&'static str, Literal, &'static [Ordering]),
    Between(Literal, Literal),
    Matches(Regex),
    IsNull,
    IsNotNull,
}

/// The operators, by their YAML names (the seeds' vocabulary).
pub const OPERATORS: &[&str] = &[
    "equals",
    "in",
    "notIn",
    "greaterThan",
    "lessThan",
    "greaterThanOrEqual",
    "lessThanOrEqual",
    "between",
    "matches",
    "isNull",
    "isNotNull",
];

#[derive(Debug, Clone)]
pub enum Condition {
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Not(Box<Condition>),
    Test { field: Field, test: Test },
}

/// A definition error inside a condition: the path to it (`when.and[1].greaterThan`), the
/// YAML token to locate its line by, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionError {
    pub path: String,
    pub token: String,
    pub message: String,
}

fn error(path: &str, token: &str, message: impl Into<String>) -> ConditionError {
    ConditionError {
        path: path.to_string(),
        token: token.to_string(),
        message: message.into(),
    }
}

impl Condition {
    /// Parses a condition node at `path` (for messages).
    pub fn parse(node: &Yaml, path: &str) -> Result<Condition, ConditionError> {
        let Yaml::Mapping(map) = node else {
            return Err(error(
                path,
                "",
                "a condition is a mapping: {field: …, <operator>: …}, {and: […]}, {or: […]} or {not: …}",
            ));
        };
        let keys: Vec<&str> = map.keys().filter_map(Yaml::as_str).collect();
        if keys.len() != map.len() {
            return Err(error(path, "", "condition keys must be text"));
        }
        for combinator in ["and", "or"] {
            if let Some(list) = map.get(combinator) {
                if map.len() != 1 {
                    return Err(error(
                        path,
                        combinator,
                        format!("`{combinator}` stands alone in its mapping (found {keys:?})"),
                    ));
                }
                let Yaml::Sequence(items) = list else {
                    return Err(error(
                        path,
                        combinator,
                        format!("`{combinator}` takes a list of conditions"),
                    ));
                };
                if items.is_empty() {
                    return Err(error(
                        path,
                        combinator,
                        format!("`{combinator}` needs at least one condition"),
                    ));
                }
                let parsed = items
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Condition::parse(c, &format!("{path}.{combinator}[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(if combinator == "and" {
                    Condition::And(parsed)
                } else {
                    Condition::Or(parsed)
                });
            }
        }
        if let Some(inner) = map.get("not") {
            if map.len() != 1 {
                return Err(error(
                    path,
                    "not",
                    format!("`not` stands alone in its mapping (found {keys:?})"),
                ));
            }
            return Ok(Condition::Not(Box::new(Condition::parse(
                inner,
                &format!("{path}.not"),
            )?)));
        }
        let Some(field) = map.get("field") else {
            return Err(error(
                path,
                keys.first().copied().unwrap_or(""),
                format!("a test needs `field` and one operator; found {keys:?}"),
            ));
        };
        let field_text = field
            .as_str()
            .ok_or_else(|| error(path, "field", "`field` is text, such as after.status"))?;
        let field = Field::parse(field_text).map_err(|m| error(path, field_text, m))?;
        let ops: Vec<&str> = keys.iter().copied().filter(|k| *k != "field").collect();
        let [op] = ops[..] else {
            return Err(error(
                path,
                field_text,
                format!("a test has exactly one operator besides `field`; found {ops:?}"),
            ));
        };
        let arg = &map[op];
        let at = format!("{path}.{op}");
        let test = Test::parse(op, arg).map_err(|m| error(&at, op, m))?;
        Ok(Condition::Test { field, test })
    }

    /// Every field the condition reads, with the literals it compares them with.
    pub fn tests(&self) -> Vec<(&Field, &Test)> {
        match self {
            Condition::And(cs) | Condition::Or(cs) => {
                cs.iter().flat_map(Condition::tests).collect()
            }
            Condition::Not(c) => c.tests(),
            Condition::Test { field, test } => vec![(field, test)],
        }
    }

    /// True, false or unknown (`None`) for one change. An error means the definition does not
    /// fit the change (a text column compared with a number, a column its table lacks).
    pub fn eval(&self, e: &ChangeEvent, source: &SourceFields) -> Result<Option<bool>, String> {
        Ok(match self {
            Condition::And(cs) => {
                let mut out = Some(true);
                for c in cs {
                    match c.eval(e, source)? {
                        Some(false) => return Ok(Some(false)),
                        None => out = None,
                        Some(true) => {}
                    }
                }
                out
            }
            Condition::Or(cs) => {
                let mut out = Some(false);
                for c in cs {
                    match c.eval(e, source)? {
                        Some(true) => return Ok(Some(true)),
                        None => out = None,
                        Some(false) => {}
                    }
                }
                out
            }
            Condition::Not(c) => c.eval(e, source)?.map(|b| !b),
            Condition::Test { field, test } => {
                let value = field_value(e, field, source)?;
                test.eval(&value)
                    .map_err(|TypeMismatch(m)| format!("{field}: {m}"))?
            }
        })
    }
}

impl Test {
    fn parse(op: &str, arg: &Yaml) -> Result<Test, String> {
        let scalar = || literal(arg);
        let list = |want: Option<usize>| -> Result<Vec<Literal>, String> {
            let Yaml::Sequence(items) = arg else {
                return Err(format!("`{op}` takes a list"));
            };
            if let Some(n) = want {
                if items.len() != n {
                    return Err(format!(
                        "`{op}` takes exactly {n} values, found {}",
                        items.len()
                    ));
                }
            } else if items.is_empty() {
                return Err(format!("`{op}` takes a non-empty list"));
            }
            items.iter().map(literal).collect()
        };
        let flag = || match arg {
            Yaml::Bool(true) | Yaml::Null => Ok(()),
            _ => Err(format!("`{op}` takes no value (write `{op}: true`)")),
        };
        use Ordering::*;
        Ok(match op {
            "equals" => Test::Equals(scalar()?),
            "in" => Test::In(list(None)?),
            "notIn" => Test::NotIn(list(None)?),
            "greaterThan" => Test::Compare(">", scalar()?, &[Greater]),
            "lessThan" => Test::Compare("<", scalar()?, &[Less]),
            "greaterThanOrEqual" => Test::Compare(">=", scalar()?, &[Greater, Equal]),
            "lessThanOrEqual" => Test::Compare("<=", scalar()?, &[Less, Equal]),
            "between" => {
                let mut bounds = list(Some(2))?.into_iter();
                let (lo, hi) = (bounds.next().expect("two"), bounds.next().expect("two"));
                Test::Between(lo, hi)
            }
            "matches" => {
                let Yaml::String(pattern) = arg else {
                    return Err("`matches` takes a regular expression as text".into());
                };
                Test::Matches(
                    Regex::new(pattern).map_err(|e| format!("bad regular expression: {e}"))?,
                )
            }
            "isNull" => {
                flag()?;
                Test::IsNull
            }
            "isNotNull" => {
                flag()?;
                Test::IsNotNull
            }
            other => {
                return Err(format!(
                    "unknown operator {other:?}; the operators are {}",
                    OPERATORS.join(", ")
                ))
            }
        })
    }

    /// The literals the test compares with.
    pub fn literals(&self) -> Vec<&Literal> {
        match self {
            Test::Equals(l) | Test::Compare(_, l, _) => vec![l],
            Test::In(ls) | Test::NotIn(ls) => ls.iter().collect(),
            Test::Between(a, b) => vec![a, b],
            Test::Matches(_) | Test::IsNull | Test::IsNotNull => vec![],
        }
    }

    fn eval(&self, v: &Operand) -> Result<Option<bool>, TypeMismatch> {
        let is = |l: &Literal, want: &[Ordering]| -> Result<Option<bool>, TypeMismatch> {
            Ok(operand::compare(v, l)?.map(|o| want.contains(&o)))
        };
        let any_equal = |ls: &[Literal]| -> Result<Option<bool>, TypeMismatch> {
            let mut out = Some(false);
            for l in ls {
                match is(l, &[Ordering::Equal])? {
                    Some(true) => return Ok(Some(true)),
                    None => out = None,
                    Some(false) => {}
                }
            }
            Ok(out)
        };
        if *v == Operand::Unavailable {
            // A TOAST placeholder: the value did not change, but this change does not carry it.
            return Ok(None);
        }
        Ok(match self {
            Test::IsNull => Some(*v == Operand::Null),
            Test::IsNotNull => Some(*v != Operand::Null),
            Test::Equals(l) => is(l, &[Ordering::Equal])?,
            Test::In(ls) => any_equal(ls)?,
            Test::NotIn(ls) => any_equal(ls)?.map(|b| !b),
            Test::Compare(_, l, want) => is(l, want)?,
            Test::Between(lo, hi) => {
                let above = is(lo, &[Ordering::Greater, Ordering::Equal])?;
                let below = is(hi, &[Ordering::Less, Ordering::Equal])?;
                match (above, below) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                }
            }
            Test::Matches(re) => match v {
                Operand::Null => None,
                Operand::Text(s) => Some(re.is_match(s)),
                other => {
                    return Err(TypeMismatch(format!(
                        "`matches` applies to text, not to a {} value",
                        other.kind()
                    )))
                }
            },
        })
    }
}

/// A YAML scalar as a literal: numbers keep their text, so `100.10` stays exact.
fn literal(v: &Yaml) -> Result<Literal, String> {
    match v {
        Yaml::Bool(b) => Ok(Literal::Bool(*b)),
        Yaml::Number(n) => {
            let text = n.to_string();
            if operand::is_decimal(&text) {
                Ok(Literal::Number(text))
            } else {
                Err(format!("{text} is not a finite number"))
            }
        }
        Yaml::String(s) => Ok(Literal::Text(s.clone())),
        Yaml::Null => Err("null is not a value to compare with; use isNull / isNotNull".into()),
        _ => Err("a value to compare with is a number, text or boolean".into()),
    }
}

/// The `source` block of a change, parsed once per change and only when a condition reads it.
#[derive(Default)]
pub struct SourceFields(std::cell::OnceCell<serde_json::Map<String, serde_json::Value>>);

impl SourceFields {
    fn get<'a>(&'a self, e: &ChangeEvent, name: &str) -> Option<&'a serde_json::Value> {
        self.0
            .get_or_init(|| serde_json::from_str(e.source_text()).unwrap_or_default())
            .get(name)
    }
}

const OP_CODES: [&str; 5] = ["c", "u", "d", "r", "t"];

/// The value of `field` in change `e`, typed by the change's schema.
fn field_value<'a>(
    e: &'a ChangeEvent,
    field: &Field,
    source: &'a SourceFields,
) -> Result<Operand<'a>, String> {
    let column = |image: Option<&'a serde_json::Map<String, serde_json::Value>>, name: &str| {
        let column = e.schema.column(name);
        if e.schema.declared && column.is_none() {
            return Err(format!("{field}: table {} has no column {name:?}", e.table));
        }
        let Some(v) = image.and_then(|i| i.get(name)) else {
            return Ok(Operand::Null);
        };
        if v.as_str() == Some(UNAVAILABLE_VALUE) {
            return Ok(Operand::Unavailable);
        }
        let ty: Option<&ColumnType> = column.map(|c| &c.ty).filter(|_| e.schema.declared);
        Ok(match ty {
            None => operand::json_operand(v),
            // As Debezium sent it (decimals as base64, times in epoch units): convert first.
            Some(ty) if e.values == ValueForm::Debezium && value::converts(ty, v) => {
                let converted =
                    value::to_sql_json(ty, v).map_err(|err| format!("{field}: {err}"))?;
                into_owned(operand::column_operand(Some(ty), &converted))
            }
            Some(ty) => operand::column_operand(Some(ty), v),
        })
    };
    match field {
        Field::After(c) => column(e.after.as_ref(), c),
        Field::Before(c) => column(e.before.as_ref(), c),
        Field::Op => Ok(Operand::Text(e.op.code().into())),
        Field::Table => Ok(Operand::Text(e.table.to_string().into())),
        Field::Source(name) => Ok(source
            .get(e, name)
            .map_or(Operand::Null, operand::json_operand)),
    }
}

fn into_owned(o: Operand<'_>) -> Operand<'static> {
    match o {
        Operand::Null => Operand::Null,
        Operand::Bool(b) => Operand::Bool(b),
        Operand::Number(n) => Operand::Number(n.into_owned().into()),
        Operand::Text(t) => Operand::Text(t.into_owned().into()),
        Operand::Time(t) => Operand::Time(t),
        Operand::Other(k) => Operand::Other(k),
        Operand::Unavailable => Operand::Unavailable,
    }
}

/// Whether `op` is one of Debezium's operation codes.
pub fn is_op_code(op: &str) -> bool {
    OP_CODES.contains(&op)
}
