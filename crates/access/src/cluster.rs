//! [`Locate`] for the cluster's `ds_cluster::Locator`: the one adapter between the cluster crate's
//! answers and what the protocol fronts see.

use crate::locate::{BoxFuture, ListKeeper, Locate, Location, Owner, OwnerCheck, Purpose};

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
            pop3: o.pop3,
            imap: o.imap,
        }),
        L::RemoteHost(address) => Location::External(address),
        L::Unknown => Location::Unknown,
        L::Refused(reason) => Location::Refused(reason),
        L::TempFail(reason) => Location::TempFail(reason),
    }
}

fn purpose(p: Purpose) -> ds_cluster::Purpose {
    match p {
        Purpose::Rcpt => ds_cluster::Purpose::Rcpt,
        Purpose::Sender => ds_cluster::Purpose::Sender,
        Purpose::Login => ds_cluster::Purpose::Login,
    }
}

impl Locate for ds_cluster::Locator {
    fn locate<'a>(&'a self, address: &'a str, p: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(
            async move { convert(ds_cluster::Locator::locate(self, address, purpose(p)).await) },
        )
    }

    fn fanout_budget(&self) -> crate::FanoutBudget {
        ds_cluster::Locator::fanout_budget(self)
    }

    fn locate_bounded<'a>(
        &'a self,
        address: &'a str,
        p: Purpose,
        budget: &'a crate::FanoutBudget,
    ) -> BoxFuture<'a, Location> {
        Box::pin(async move {
            convert(ds_cluster::Locator::locate_bounded(self, address, purpose(p), budget).await)
        })
    }

    fn relocate<'a>(&'a self, address: &'a str, p: Purpose) -> BoxFuture<'a, Location> {
        Box::pin(
            async move { convert(ds_cluster::Locator::relocate(self, address, purpose(p)).await) },
        )
    }

    fn list_keepers_checked<'a>(&'a self, list: &'a str) -> BoxFuture<'a, Option<Vec<ListKeeper>>> {
        Box::pin(async move {
            let answer = ds_cluster::Locator::list_keepers(self, list).await;
            for (peer, reason) in &answer.unreachable {
                tracing::warn!(%list, %peer, %reason, "list keeper could not be asked; the post waits for it");
            }
            if !answer.unreachable.is_empty() {
                return None;
            }
            Some(
                answer
                    .keepers
                    .into_iter()
                    .map(|k| ListKeeper {
                        node: k.node,
                        smtp: k.smtp,
                    })
                    .collect(),
            )
        })
    }

    fn authenticate<'a>(
        &'a self,
        owner: &'a Owner,
        address: &'a str,
        password: &'a str,
        client_ip: std::net::IpAddr,
    ) -> BoxFuture<'a, OwnerCheck> {
        Box::pin(async move {
            match ds_cluster::Locator::authenticate(self, &owner.node, address, password, client_ip)
                .await
            {
                ds_cluster::AuthAnswer::Ok(canonical) => OwnerCheck::Ok(canonical),
                ds_cluster::AuthAnswer::Bad => OwnerCheck::Bad,
                ds_cluster::AuthAnswer::Temp(reason) => OwnerCheck::TempFail(reason),
            }
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

#[cfg(test)]
mod tests {
    use ds_cluster::Kind;

    use super::*;

    fn owner(kind: Kind) -> ds_cluster::Owner {
        ds_cluster::Owner {
            node: "office-b".into(),
            canonical: "bob@company.com".into(),
            kind,
            can_receive: true,
            smtp: "b:25".into(),
            pop3: "b:110".into(),
            imap: "b:143".into(),
        }
    }

    #[test]
    fn cluster_locations_convert() {
        let Location::Remote(o) = convert(ds_cluster::Location::Remote(owner(Kind::Account)))
        else {
            panic!()
        };
        assert_eq!(
            (o.is_list, o.pop3.as_str(), o.imap.as_str()),
            (false, "b:110", "b:143")
        );
        let Location::Remote(o) = convert(ds_cluster::Location::Remote(owner(Kind::List))) else {
            panic!()
        };
        assert!(o.is_list);
        assert_eq!(
            convert(ds_cluster::Location::Refused("loop".into())),
            Location::Refused("loop".into())
        );
        assert_eq!(
            convert(ds_cluster::Location::RemoteHost("x@y.org".into())),
            Location::External("x@y.org".into())
        );
    }
}
