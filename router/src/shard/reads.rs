//! A shard's log reads, off the shard's thread on the blocking pool: catch-ups of
//! subscribers behind, and delta answers, at most `MAX_READS` at once.

use super::*;

impl Shard {
    /// Starts a log read for each subscriber that catches up from the log and has room in
    /// its queue, one chunk each (at most [`MAX_READS`] reads at once). Returns whether one
    /// waits for room in its queue (reads in flight wake the shard when they finish).
    pub(super) fn pump_catch_ups(&mut self) -> bool {
        let catch_ups = self.core.catching_up();
        let mut pending = false;
        for c in catch_ups {
            let lane = Lane::Class(c.class);
            let room = c.handle.capacity(lane) / 2;
            if c.handle.is_closed() {
                continue;
            }
            let key = (c.conn, c.swarm.clone(), c.class);
            if self.catch_up_reads.contains(&key) {
                continue;
            }
            if c.handle.queued(lane) >= room || self.reads_in_flight() >= MAX_READS {
                pending = true;
                continue;
            }
            let chunk = CATCH_UP_CHUNK_OPS.min(room - c.handle.queued(lane)).max(1);
            let Some(plan) = self.log.plan_read(&c.swarm, c.from) else {
                continue;
            };
            self.catch_up_reads.insert(key);
            let done = self.reads_done.clone();
            tokio::task::spawn_blocking(move || {
                let result = plan.read_noting_file(chunk, CATCH_UP_CHUNK_BYTES);
                let _ = done.send(ReadDone::CatchUp {
                    conn: c.conn,
                    swarm: c.swarm,
                    class: c.class,
                    from: c.from,
                    to: c.to,
                    handle: c.handle,
                    result,
                });
            });
        }
        pending
    }

    pub(super) fn reads_in_flight(&self) -> usize {
        self.catch_up_reads.len() + self.delta_reads.len()
    }

    /// A read finished: a catch-up step is handed to the core, a delta's slot is freed.
    pub(super) fn read_done(&mut self, done: ReadDone, now: Now) {
        match done {
            ReadDone::CatchUp {
                conn,
                swarm,
                class,
                from,
                to,
                handle,
                result,
            } => {
                self.catch_up_reads.remove(&(conn, swarm.clone(), class));
                match result {
                    Ok(records) => {
                        let read_up_to = records.last().map(|r| r.op).unwrap_or(to).min(to);
                        let ops: Vec<ReplayedOp> = records
                            .into_iter()
                            .filter(|r| r.op <= to)
                            .filter_map(|r| {
                                let (class, source, target) = deliver_meta(&r.frame)?;
                                Some(ReplayedOp {
                                    op: r.op,
                                    class,
                                    source,
                                    target,
                                    frame: r.frame,
                                })
                            })
                            .collect();
                        self.core.handle_replayed(
                            conn,
                            &swarm,
                            class,
                            from,
                            &ops,
                            read_up_to,
                            now.instant,
                        );
                    }
                    // The file went (a compaction or retention ran while the read was on
                    // its way): the next pump plans the read again from the log as it is.
                    Err(failed)
                        if failed.error.kind() == std::io::ErrorKind::NotFound
                            && !self.log.has_segment(&swarm, &failed.path) => {}
                    Err(failed) => {
                        // The swarm's appends are unaffected; this subscriber cannot be
                        // caught up, so it is disconnected and may resume later.
                        tracing::error!(%swarm, error = %failed, "reading the event log for a catch-up failed");
                        handle.request_close(swarmbus_schema::ErrorCode::SwarmUnavailable);
                    }
                }
            }
            ReadDone::Delta { conn, retry } => {
                self.delta_reads.remove(&conn);
                if let Some((mut read, path)) = retry {
                    if self.log.has_segment(&read.query.swarm, &path) || read.tries >= READ_RETRIES
                    {
                        let reason = format!("{}: not found", path.display());
                        read.answer(Err(reason), 0, 0, OpId(0));
                    } else {
                        read.tries += 1;
                        self.waiting_deltas.push_front(read);
                    }
                }
            }
        }
        self.start_deltas();
    }

    /// Starts the delta reads waiting, in order, while read slots are free (one per
    /// connection at a time).
    pub(super) fn start_deltas(&mut self) {
        while self.reads_in_flight() < MAX_READS {
            let next = self
                .waiting_deltas
                .iter()
                .position(|read| !self.delta_reads.contains(&read.query.to_handle.conn()));
            let Some(read) = next.and_then(|at| self.waiting_deltas.remove(at)) else {
                return;
            };
            // Never more than the reconciliation queue has room for, so an answer cannot
            // overflow it; the rest is asked for again (`more`).
            let query = &read.query;
            let lane = Lane::Class(Class::Reconciliation);
            let room = query
                .to_handle
                .capacity(lane)
                .saturating_sub(query.to_handle.queued(lane));
            let span = (query.to.0.saturating_add(1)).saturating_sub(query.from.0) as usize;
            let limit = span.min(room);
            let horizon = self.log.horizon(&query.swarm);
            let plan = match self.log.plan_read(&query.swarm, query.from) {
                Some(plan) if limit > 0 => plan,
                _ => {
                    read.answer(Ok(Vec::new()), limit, span, horizon);
                    continue;
                }
            };
            let conn = query.to_handle.conn();
            self.delta_reads.insert(conn);
            let done = self.reads_done.clone();
            tokio::task::spawn_blocking(move || {
                let retry = match plan.read_noting_file(limit, CATCH_UP_CHUNK_BYTES) {
                    Err(failed) if failed.error.kind() == std::io::ErrorKind::NotFound => {
                        Some((read, failed.path))
                    }
                    result => {
                        let result = result.map_err(|failed| failed.to_string());
                        read.answer(result, limit, span, horizon);
                        None
                    }
                };
                let _ = done.send(ReadDone::Delta { conn, retry });
            });
        }
    }
}

impl DeltaRead {
    /// Answers from `records` (read from `from` with at most `limit` records).
    pub(super) fn answer(
        &self,
        records: Result<Vec<crate::log::Record>, String>,
        limit: usize,
        span: usize,
        horizon: OpId,
    ) {
        let query = &self.query;
        let (from, to) = (query.from, query.to);
        let lane = Lane::Class(Class::Reconciliation);
        match records {
            Ok(records) => {
                // The read stops at `limit` records or once CATCH_UP_CHUNK_BYTES are read:
                // a read that reached neither the end of the range nor past it, with that
                // many bytes, may have been cut by the byte bound.
                let read_past_end = records.last().is_some_and(|r| r.op > to);
                let read_bytes: usize = records.iter().map(|r| r.frame.len()).sum();
                let cut_by_bytes = !read_past_end && read_bytes >= CATCH_UP_CHUNK_BYTES;
                let records: Vec<_> = records.into_iter().filter(|r| r.op <= to).collect();
                // Where this answer stops: the last op read when a bound cut it short, else
                // the end of the range.
                let cut_short = limit < span || records.len() >= limit || cut_by_bytes;
                let last_op = match records.last() {
                    Some(last) if cut_short => last.op,
                    None if cut_short => OpId(from.0.saturating_sub(1)),
                    _ => to,
                };
                let mut sent = 0u32;
                for record in records {
                    let wanted = deliver_meta(&record.frame).is_some_and(|(_, _, target)| {
                        !targeted_elsewhere(target.as_deref(), &query.agent)
                    });
                    if wanted {
                        let frame = OutFrame {
                            head: record.frame,
                            body: bytes::Bytes::new(),
                        };
                        if query.to_handle.push(lane, frame).is_ok() {
                            sent += 1;
                        }
                    }
                }
                reply(
                    &query.to_handle,
                    &Message::DeltaAck(DeltaAck {
                        request_id: query.request_id,
                        epoch: query.epoch,
                        first_op: from,
                        last_op,
                        count: sent,
                        more: query.more || last_op < to,
                        compacted: from <= horizon,
                    }),
                );
            }
            Err(reason) => refuse(
                &query.to_handle,
                query.request_id,
                &CoreError::Unavailable {
                    swarm: query.swarm.to_string(),
                    reason,
                },
            ),
        }
    }
}
