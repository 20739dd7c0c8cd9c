//! Reading the internal swarms back at start: control records, pins and the job logs.

use super::*;

/// The payload of the job spec in a job log's record (a Deliver frame with its prefix).
pub(super) fn spec_payload(frame: &Bytes) -> Result<Bytes, String> {
    let deliver = match frame
        .get(4..)
        .map(|_| swarmbus_schema::decode(frame.slice(4..), &DecodeOptions::default()))
    {
        Some(Ok(Message::Deliver(deliver))) => deliver,
        _ => return Err("the record holds no Deliver frame".to_owned()),
    };
    let key = deliver.key.as_deref().unwrap_or_default();
    match JobRecord::parse(key, &deliver.payload) {
        Some(JobRecord::Spec(spec)) => Ok(spec.payload),
        _ => Err(format!("the record {key:?} is not a job's spec")),
    }
}

/// A record of the router's control swarm.
pub(super) fn control_record((key, payload): (String, Bytes)) -> InternalRecord {
    InternalRecord {
        swarm: CONTROL_SWARM.to_owned(),
        key,
        payload,
    }
}

/// Refuses to start on a damaged internal log (see [`RouterError::DamagedInternalLog`]).
pub(super) fn check_internal_logs(recovered: &[log::SwarmLog]) -> Result<(), RouterError> {
    match recovered
        .iter()
        .find(|s| s.is_internal() && s.unavailable.is_some())
    {
        Some(swarm) => Err(damaged(
            swarm,
            swarm.unavailable.clone().unwrap_or_default(),
        )),
        None => Ok(()),
    }
}

pub(super) fn damaged(swarm: &log::SwarmLog, reason: String) -> RouterError {
    let (holds, without) = if swarm.name == CONTROL_SWARM {
        (
            "the lease tokens, paused swarms, stopped agents and drained nodes",
            "paused swarms run, stopped agents may reconnect, and lease tokens start again \
             at 1, so fenced resources must reset their token checks",
        )
    } else if swarm.name == PINS_SWARM {
        (
            "the affine sessions' pins",
            "sessions are placed afresh and may move to other nodes",
        )
    } else {
        (
            "the swarm's accepted jobs, their attempts and their results",
            "those jobs are gone: submitters must submit them again",
        )
    };
    RouterError::DamagedInternalLog {
        swarm: swarm.name.clone(),
        path: swarm.dir.clone(),
        reason,
        holds,
        without,
    }
}

/// The session pins in the router's pin log, oldest first (the latest per key wins).
pub(super) fn read_pins(recovered: &[log::SwarmLog]) -> Result<Vec<PinWrite>, RouterError> {
    Ok(read_records(recovered, PINS_SWARM)?
        .into_iter()
        .filter_map(|(key, payload)| {
            PinWrite::parse(swarmbus_proto::workers::pin_session_of(&key), &payload)
        })
        .collect())
}

/// The Deliver frames of one of the router's own logs, oldest first; a log that cannot be
/// read refuses the start (never a silent fresh state).
pub(super) fn read_internal(
    swarm: &log::SwarmLog,
) -> Result<Vec<swarmbus_schema::Deliver>, RouterError> {
    let records = swarm
        .read_from(OpId(1), usize::MAX, usize::MAX)
        .map_err(|error| damaged(swarm, format!("reading it failed: {error}")))?;
    let options = DecodeOptions::default();
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        if record.frame.is_empty() {
            continue; // a void record: an op refused when the log failed
        }
        let mut decoder = FrameDecoder::new(record.frame.len().max(1024));
        decoder.push(record.frame);
        match decoder.next_message(&options) {
            Ok(Some(Message::Deliver(deliver))) => out.push(deliver),
            other => {
                let what = match other {
                    Err(error) => error.to_string(),
                    _ => "not a Deliver frame".to_owned(),
                };
                return Err(damaged(swarm, format!("op {}: {what}", record.op.0)));
            }
        }
    }
    Ok(out)
}

/// The (key, payload) records of one of the router's own swarms, oldest first.
pub(super) fn read_records(
    recovered: &[log::SwarmLog],
    name: &str,
) -> Result<Vec<(String, Bytes)>, RouterError> {
    let Some(swarm) = recovered.iter().find(|s| s.name == name) else {
        return Ok(Vec::new());
    };
    Ok(read_internal(swarm)?
        .into_iter()
        .filter_map(|deliver| Some((deliver.key?, deliver.payload)))
        .collect())
}

/// The job logs' records (`$jobs.*`), in log order per log, and the op of each job's spec
/// record.
pub(super) fn read_job_records(recovered: &[log::SwarmLog]) -> Result<JobLogs, RouterError> {
    let mut out = Vec::new();
    let mut spec_ops = HashMap::new();
    for swarm in recovered
        .iter()
        .filter(|s| s.name.starts_with(JOBS_SWARM_PREFIX))
    {
        for deliver in read_internal(swarm)? {
            if let Some(parsed) = deliver
                .key
                .as_deref()
                .and_then(|key| JobRecord::parse(key, &deliver.payload))
            {
                if let JobRecord::Spec(spec) = &parsed {
                    spec_ops.insert(spec.job_id, deliver.op_id);
                }
                out.push(parsed);
            }
        }
    }
    Ok((out, spec_ops))
}
