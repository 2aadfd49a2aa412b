//! `StartModelConsumer`: receives `start_model` records from the bus, turns
//! each into `CoordinatorMsg::Start` and commits once the coordinator has
//! recorded the jobs (a coordinator that cannot reach its database fails
//! this consumer without a commit, so the record is read again after the
//! restart). Malformed records go to `start_model.dlq` with the error in the
//! headers.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::types::{topics, StartModel};
use tickmesh_io::bus::{dead_letter, BusConfig, SharedPublisher, Subscription};
use tracing::{info, warn};

use crate::coordinator::CoordinatorMsg;

pub struct StartModelConsumer;

/// Messages of [`StartModelConsumer`].
#[derive(Debug)]
pub enum StartConsumerMsg {
    /// Take the next record (sent to itself).
    Poll,
}

impl ractor::Message for StartConsumerMsg {}

#[derive(Clone)]
pub struct StartConsumerArgs {
    pub bus: BusConfig,
    pub publisher: SharedPublisher,
    pub coordinator: ActorRef<CoordinatorMsg>,
}

pub struct StartConsumerState {
    sub: Box<dyn Subscription>,
    args: StartConsumerArgs,
}

impl Actor for StartModelConsumer {
    type Msg = StartConsumerMsg;
    type State = StartConsumerState;
    type Arguments = StartConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StartConsumerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let sub = args
            .bus
            .subscribe(topics::START_MODEL, "coordinator")
            .await?;
        myself.cast(StartConsumerMsg::Poll)?;
        Ok(StartConsumerState { sub, args })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(rec) = st.sub.poll(Duration::from_millis(500)).await? {
            match StartModel::parse(&rec.payload) {
                Ok(m) => {
                    info!(interval = %m.interval, tickers = m.tickers.len(), watermark = %m.watermark, "start_model received");
                    let started = ractor::call_t!(
                        st.args.coordinator,
                        |reply| CoordinatorMsg::Start {
                            tickers: m.tickers,
                            interval: m.interval,
                            model: None,
                            epochs: None,
                            reply: Some(reply),
                        },
                        60_000
                    )?;
                    if started.unavailable {
                        return Err(format!(
                            "start_model at offset {} not recorded: {}",
                            rec.offset,
                            started.refused.join("; ")
                        )
                        .into());
                    }
                    for why in &started.refused {
                        warn!(offset = rec.offset, refused = %why, "start_model ticker refused");
                    }
                }
                Err(e) => {
                    warn!(offset = rec.offset, error = %e, "malformed start_model sent to the dead-letter topic");
                    dead_letter(st.args.publisher.as_ref(), &rec, &e.to_string()).await?;
                }
            }
            st.sub.commit(&rec).await?;
        }
        myself.cast(StartConsumerMsg::Poll)?;
        Ok(())
    }
}
