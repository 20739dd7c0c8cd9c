//! The connection vocabulary shared by the state machines and the runtime: a connection's
//! id and the outbound lanes its frames are queued on.

use swarmbus_schema::Class;

/// Router-wide connection id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How the state machines address a connection: the runtime's handle for it (an
/// `Arc` of its outbox, which queues the frames for the wire), cloned into every frame a
/// machine asks to send. Tests use the [`ConnId`] itself.
pub trait Handle {
    fn conn(&self) -> ConnId;
}

impl Handle for ConnId {
    fn conn(&self) -> ConnId {
        *self
    }
}

impl<T: Handle + ?Sized> Handle for std::sync::Arc<T> {
    fn conn(&self) -> ConnId {
        (**self).conn()
    }
}

/// Which outbound queue of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Replies on the session stream: Welcome, SubscribeAck, PublishAck, Error.
    Session,
    /// Deliveries of one class on that class's stream.
    Class(Class),
    /// Job traffic (leases and cancels to workers, updates to submitters) on the job
    /// stream, whose priority is below command's.
    Jobs,
    /// Answers to the requests that come on the client's job stream (submits, results) on
    /// a stream of their own: a client that reads its job updates slowly holds back only
    /// the job stream, never the answers its submits wait for.
    JobAnswers,
}

impl Lane {
    pub const COUNT: usize = 3 + Class::COUNT;

    pub fn index(self) -> usize {
        match self {
            Lane::Session => 0,
            Lane::Class(class) => 1 + class.index(),
            Lane::Jobs => 1 + Class::COUNT,
            Lane::JobAnswers => 2 + Class::COUNT,
        }
    }

    pub fn all() -> impl Iterator<Item = Lane> {
        std::iter::once(Lane::Session)
            .chain(Class::ALL.into_iter().map(Lane::Class))
            .chain([Lane::Jobs, Lane::JobAnswers])
    }

    /// The QUIC stream priority of the lane's stream.
    pub fn stream_priority(self) -> i32 {
        match self {
            Lane::Session => i32::MAX,
            Lane::Class(class) => class.stream_priority(),
            Lane::Jobs | Lane::JobAnswers => swarmbus_schema::JOB_STREAM_PRIORITY,
        }
    }

    /// Telemetry and job lanes are written from the router's bulk runtime.
    pub fn is_bulk(self) -> bool {
        matches!(
            self,
            Lane::Class(Class::Telemetry) | Lane::Jobs | Lane::JobAnswers
        )
    }

    /// Telemetry lanes drop their oldest frames when full; the others may not.
    pub fn sheddable(self) -> bool {
        matches!(self, Lane::Class(class) if class.is_sheddable())
    }
}
