//! `cdc-lake routes sql`: each filter as a Flink SQL `INSERT … SELECT … WHERE`, like the seeds'
//! code generator, so teams that keep Flink can run the same rules there.
//!
//! The source table is the Kafka topic read with the `debezium-json` format, which exposes the
//! `after` columns by name; the operation and `source` fields are expected as metadata columns
//! (`op_type`, `source_<field>`, `source_table`). `before.<column>` has no equivalent in a
//! changelog table and is reported as unsupported.

use super::condition::{Condition, Field, Test};
use super::operand::Literal;
use super::spec::{Filter, NamePattern};

/// The SQL for one filter, or why it cannot be expressed.
pub fn filter_sql(f: &Filter) -> Result<String, String> {
    let source = match (&f.topics[..], &f.tables[..]) {
        ([NamePattern::Exact(t)], _) => ident(t),
        (_, [NamePattern::Exact(t)]) => ident(t),
        _ => return Err("Flink SQL needs one exact source topic or table per filter".into()),
    };
    let ops: Vec<String> = f
        .ops
        .iter()
        .map(|o| literal(&Literal::Text(op_name(o).into())))
        .collect();
    let mut wheres = vec![];
    if ops.len() < 5 {
        wheres.push(format!("`op_type` IN ({})", ops.join(", ")));
    }
    if let Some(c) = &f.when {
        wheres.push(condition(c)?);
    }
    let where_clause = if wheres.is_empty() {
        String::new()
    } else {
        format!("\nWHERE {}", wheres.join("\n  AND "))
    };
    Ok(format!(
        "-- filter {id} (consumer {consumer})\nINSERT INTO {sink}\nSELECT *, ROW({id_lit}, {consumer_lit}, CURRENT_TIMESTAMP) AS filterMetadata\nFROM {source}{where_clause};\n",
        id = f.id,
        consumer = f.consumer,
        sink = ident(&f.topic),
        id_lit = literal(&Literal::Text(f.id.clone())),
        consumer_lit = literal(&Literal::Text(f.consumer.clone())),
    ))
}

/// Flink's changelog row kinds for Debezium's operation codes.
fn op_name(op: &str) -> &'static str {
    match op {
        "c" | "r" => "INSERT",
        "u" => "UPDATE_AFTER",
        "d" => "DELETE",
        _ => "TRUNCATE",
    }
}

fn ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

fn literal(l: &Literal) -> String {
    match l {
        Literal::Bool(b) => b.to_string().to_uppercase(),
        Literal::Number(n) => n.clone(),
        Literal::Text(t) => format!("'{}'", t.replace('\'', "''")),
    }
}

fn field(f: &Field) -> Result<String, String> {
    Ok(match f {
        Field::After(c) => ident(c),
        Field::Op => "`op_type`".into(),
        Field::Table => "`source_table`".into(),
        Field::Source(s) => ident(&format!("source_{s}")),
        Field::Before(_) => return Err(format!("{f} has no Flink SQL equivalent")),
    })
}

fn condition(c: &Condition) -> Result<String, String> {
    let join = |cs: &[Condition], op: &str| -> Result<String, String> {
        let parts = cs.iter().map(condition).collect::<Result<Vec<_>, _>>()?;
        Ok(format!("({})", parts.join(&format!(" {op} "))))
    };
    let list = |ls: &[Literal]| ls.iter().map(literal).collect::<Vec<_>>().join(", ");
    Ok(match c {
        Condition::And(cs) => join(cs, "AND")?,
        Condition::Or(cs) => join(cs, "OR")?,
        Condition::Not(c) => format!("NOT {}", condition(c)?),
        Condition::Test { field: f, test } => {
            let f = field(f)?;
            match test {
                Test::Equals(l) => format!("{f} = {}", literal(l)),
                Test::In(ls) => format!("{f} IN ({})", list(ls)),
                Test::NotIn(ls) => format!("{f} NOT IN ({})", list(ls)),
                Test::Compare(op, l, _) => format!("{f} {op} {}", literal(l)),
                Test::Between(a, b) => format!("{f} BETWEEN {} AND {}", literal(a), literal(b)),
                Test::Matches(re) => format!(
                    "REGEXP({f}, {})",
                    literal(&Literal::Text(re.as_str().to_string()))
                ),
                Test::IsNull => format!("{f} IS NULL"),
                Test::IsNotNull => format!("{f} IS NOT NULL"),
            }
        }
    })
}
