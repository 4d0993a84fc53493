//! Topology labels, failure-domain levels and the distance between two
//! places in the cluster.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::PlacementError;

/// A failure-domain level, narrowest first, plus `Any` for VM proximity.
///
/// The order is meaningful: `Host < Rack < Zone < Any`. "Within distance L"
/// means [`Topology::distance`] `<= L`, and relaxing a requirement moves to
/// the next wider level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The same machine.
    Host,
    /// The same rack (and therefore the same zone).
    Rack,
    /// The same zone.
    Zone,
    /// Anywhere in the cluster. Not a failure domain: only a proximity level.
    Any,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 4] = [Level::Host, Level::Rack, Level::Zone, Level::Any];

    /// The next wider level, `None` for `Any`.
    pub fn wider(self) -> Option<Level> {
        match self {
            Level::Host => Some(Level::Rack),
            Level::Rack => Some(Level::Zone),
            Level::Zone => Some(Level::Any),
            Level::Any => None,
        }
    }

    /// The lowercase name used in JSON, the CLI and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Host => "host",
            Level::Rack => "rack",
            Level::Zone => "zone",
            Level::Any => "any",
        }
    }

    /// Index into per-level tables for the three failure-domain levels.
    pub(crate) fn domain_index(self) -> Option<usize> {
        match self {
            Level::Host => Some(0),
            Level::Rack => Some(1),
            Level::Zone => Some(2),
            Level::Any => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = PlacementError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| PlacementError::UnknownLevel { text: text.to_owned() })
    }
}

/// Where a server sits: zone, rack and host labels, read hierarchically.
///
/// Rack labels are only meaningful inside their zone and host labels inside
/// their rack, so "same rack" means same zone *and* same rack label. A VM host
/// and a storage server on one machine carry the same three labels; that is
/// how "data local to the host" is recognised.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Topology {
    pub zone: String,
    pub rack: String,
    pub host: String,
}

impl Topology {
    pub fn new(zone: impl Into<String>, rack: impl Into<String>, host: impl Into<String>) -> Self {
        Topology { zone: zone.into(), rack: rack.into(), host: host.into() }
    }

    /// Whether `self` and `other` are in one failure domain at `level`.
    /// Always true at `Any`.
    pub fn same_domain(&self, other: &Topology, level: Level) -> bool {
        match level {
            Level::Host => self.zone == other.zone && self.rack == other.rack && self.host == other.host,
            Level::Rack => self.zone == other.zone && self.rack == other.rack,
            Level::Zone => self.zone == other.zone,
            Level::Any => true,
        }
    }

    /// The narrowest level at which both are in one domain: `Host` for the
    /// same machine, `Any` for different zones.
    pub fn distance(&self, other: &Topology) -> Level {
        Level::ALL.into_iter().find(|&l| self.same_domain(other, l)).unwrap_or(Level::Any)
    }

    /// A key naming this server's domain at `level`: labels above the level
    /// are blanked, so equal keys mean the same domain.
    pub(crate) fn domain_key(&self, level: Level) -> (&str, &str, &str) {
        match level {
            Level::Host => (&self.zone, &self.rack, &self.host),
            Level::Rack => (&self.zone, &self.rack, ""),
            Level::Zone => (&self.zone, "", ""),
            Level::Any => ("", "", ""),
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.zone, self.rack, self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: distance reads labels hierarchically, so a rack label reused in
    /// another zone is not "the same rack".
    #[test]
    fn distance_is_hierarchical() {
        let a = Topology::new("z1", "r1", "h1");
        assert_eq!(a.distance(&Topology::new("z1", "r1", "h1")), Level::Host);
        assert_eq!(a.distance(&Topology::new("z1", "r1", "h2")), Level::Rack);
        assert_eq!(a.distance(&Topology::new("z1", "r2", "h1")), Level::Zone);
        assert_eq!(a.distance(&Topology::new("z2", "r1", "h1")), Level::Any);
        assert!(!a.same_domain(&Topology::new("z2", "r1", "h1"), Level::Rack));
        assert!(a.same_domain(&Topology::new("z2", "r9", "h9"), Level::Any));
    }

    #[test]
    fn levels_order_parse_and_widen() {
        assert!(Level::Host < Level::Rack && Level::Rack < Level::Zone && Level::Zone < Level::Any);
        assert_eq!("Rack".parse::<Level>().ok(), Some(Level::Rack));
        assert!(matches!("shelf".parse::<Level>(), Err(PlacementError::UnknownLevel { .. })));
        assert_eq!(Level::Zone.wider(), Some(Level::Any));
        assert_eq!(Level::Any.wider(), None);
    }
}
