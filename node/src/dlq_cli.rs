//! `tickmesh dlq list|replay <topic>`: the dead letters of a topic, and
//! their re-injection after a fix (see [`tickmesh_ingest::dlq`]).

use anyhow::Result;
use clap::Subcommand;
use tickmesh_core::config::ClusterConfig;
use tickmesh_ingest::dlq;
use tickmesh_io::Adapters;

#[derive(Subcommand, Debug)]
pub enum DlqCmd {
    /// Show the dead letters a replay would re-inject (--all: every one on the bus).
    List {
        /// The source topic (h_alpaca, h_macrodata, …) or its .dlq.
        topic: String,
        #[arg(long)]
        all: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish the dead letters again to their source topic, then mark them replayed.
    Replay { topic: String },
}

pub async fn run(cfg: &ClusterConfig, cmd: DlqCmd) -> Result<()> {
    let adapters = Adapters::connect(cfg).await?;
    match cmd {
        DlqCmd::List { topic, all, json } => {
            let letters = dlq::list(&adapters.bus, &topic, all).await?;
            for d in &letters {
                if json {
                    println!("{}", serde_json::to_string(d)?);
                } else {
                    let at = d
                        .dead_lettered_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into());
                    let src = match (d.source_partition, d.source_offset) {
                        (Some(p), Some(o)) => format!("{}[{p}]@{o}", d.source_topic),
                        _ => d.source_topic.clone(),
                    };
                    let size = match d.truncated_from {
                        Some(n) => format!("{n} B (truncated)"),
                        None => format!("{} B", d.payload_bytes),
                    };
                    println!(
                        "{}@{}  {at}  from {src}  key={}  {size}\n    {}",
                        d.partition,
                        d.offset,
                        d.key.as_deref().unwrap_or("-"),
                        d.error
                    );
                }
            }
            if !json {
                println!("{} dead letters", letters.len());
            }
        }
        DlqCmd::Replay { topic } => {
            let r = dlq::replay(&adapters.bus, adapters.publisher.as_ref(), &topic).await?;
            println!(
                "replayed {} dead letters; {} truncated ones left in place",
                r.replayed, r.not_replayable
            );
        }
    }
    Ok(())
}
