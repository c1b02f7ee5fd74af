//! A small blocking connection pool: at most `size` connections, opened on demand, handed out
//! one caller at a time, dropped instead of returned when they broke.
//!
//! Why not r2d2 or deadpool: omniq needs only "borrow a connection, with a bounded wait", and
//! each connection must be set up the same way (search_path, synchronous_commit). Forty lines
//! here cost less than a dependency and its own thread.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use postgres::{Client, Statement};

use super::ops::Stmts;
use super::Target;
use crate::error::{Error, Result};

pub(crate) struct Pool {
    target: Target,
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
    stmts: Option<Arc<Stmts>>,
}

struct State {
    idle: Vec<Conn>,
    /// Connections open, idle or lent.
    open: usize,
}

impl Pool {
    pub(crate) fn new(target: Target, size: usize, timeout: Duration) -> Pool {
        Pool {
            target,
            size: size.max(1),
            timeout,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// A connection, waiting at most the pool's timeout for one to be free.
    pub(crate) fn get(&self) -> Result<Pooled<'_>> {
        let deadline = Instant::now() + self.timeout;
        let mut st = self.state.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                if conn.client.is_closed() {
                    st.open -= 1;
                    continue;
                }
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if st.open < self.size {
                st.open += 1;
                drop(st);
                return match self.target.connect() {
                    Ok(client) => Ok(Pooled {
                        pool: self,
                        conn: Some(Conn {
                            client,
                            prepared: HashMap::new(),
                            stmts: None,
                        }),
                    }),
                    Err(e) => {
                        self.state.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            if self.freed.wait_until(&mut st, deadline).timed_out() {
                return Err(Error::Storage(format!(
                    "PostgreSQL {}: no pooled connection became free within {:?} (pool size {})",
                    self.target.label(),
                    self.timeout,
                    self.size
                )));
            }
        }
    }

    fn give_back(&self, conn: Conn) {
        let mut st = self.state.lock();
        if conn.client.is_closed() {
            st.open -= 1;
        } else {
            st.idle.push(conn);
        }
        drop(st);
        self.freed.notify_one();
    }
}

/// A borrowed connection; returned to the pool when dropped (or closed if it broke).
pub(crate) struct Pooled<'a> {
    pool: &'a Pool,
    /// Always `Some` until drop.
    conn: Option<Conn>,
}

impl Pooled<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("a Pooled holds its connection until drop"))
    }

    /// The transition statements, prepared on this connection (once per connection).
    pub(crate) fn stmts(&mut self) -> std::result::Result<Arc<Stmts>, postgres::Error> {
        let conn = self.conn();
        if let Some(s) = &conn.stmts {
            return Ok(s.clone());
        }
        let s = Arc::new(Stmts::prepare(&mut conn.client)?);
        conn.stmts = Some(s.clone());
        Ok(s)
    }

    /// `sql` prepared on this connection (once per connection).
    pub(crate) fn prepared(
        &mut self,
        sql: &'static str,
    ) -> std::result::Result<Statement, postgres::Error> {
        let conn = self.conn();
        if let Some(s) = conn.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = conn.client.prepare(sql)?;
        conn.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

impl Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self
            .conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("a Pooled holds its connection until drop"))
            .client
    }
}

impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.conn().client
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.give_back(c);
        }
    }
}
