//! [`RecipientLocator`] for the cluster's `ds_cluster::Locator`.

use crate::locate::{BoxFuture, ListKeeper, Location, Owner, Purpose, RecipientLocator};

fn convert(location: ds_cluster::Location) -> Location {
    use ds_cluster::Location as L;
    match location {
        L::Local { address, enabled } => Location::Local { address, enabled },
        L::LocalList(list) => Location::LocalList(list),
        L::Remote(o) => Location::Remote(Owner {
            node: o.node,
            canonical: o.canonical,
            is_list: o.kind == ds_cluster::Kind::List,
            can_receive: o.can_receive,
            smtp: o.smtp,
        }),
        L::RemoteHost(address) => Location::External(address),
        L::Unknown => Location::Unknown,
        L::Refused(reason) => {
            tracing::debug!(%reason, "address refused by the Locator");
            Location::Unknown
        }
        L::TempFail(reason) => Location::TempFail(reason),
    }
}

fn purpose(p: Purpose) -> ds_cluster::Purpose {
    match p {
        Purpose::Rcpt => ds_cluster::Purpose::Rcpt,
        Purpose::Sender => ds_cluster::Purpose::Sender,
    }
}

impl RecipientLocator for ds_cluster::Locator {
    fn locate<'a>(&'a self, address: &'a str, p: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(
            async move { convert(ds_cluster::Locator::locate(self, address, purpose(p)).await) },
        )
    }

    fn relocate<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Location> {
        Box::pin(async move {
            convert(ds_cluster::Locator::relocate(self, address, ds_cluster::Purpose::Rcpt).await)
        })
    }

    fn list_keepers<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Vec<ListKeeper>> {
        Box::pin(async move {
            let answer = ds_cluster::Locator::list_keepers(self, list).await;
            for (peer, reason) in &answer.unreachable {
                tracing::warn!(%list, %peer, %reason, "list keeper could not be asked; its copy is skipped");
            }
            answer
                .keepers
                .into_iter()
                .map(|k| ListKeeper {
                    node: k.node,
                    smtp: k.smtp,
                })
                .collect()
        })
    }
}
