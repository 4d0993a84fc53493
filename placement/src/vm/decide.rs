//! The decision: qualify, score, choose, relax, explain.
//!
//! Hot path ([`ClusterIndex::place`] with `Explain::Summary`):
//! 1. Intersect the data sets' "holds every chunk" domain lists at the
//!    level: only hosts in those domains are close enough.
//! 2. Visit those hosts rack by rack, the racks with the highest score bound
//!    first. Health, capacity and anti-affinity are checked for every one
//!    (the counts are exact), but once the top list is full a rack whose
//!    bound cannot reach its last entry is not scored.
//! 3. Count every other host as too far (or unhealthy) arithmetically.
//! 4. Build notes for a handful of hosts only.
//!
//! `Explain::Full` also builds a note for every host, from the rules written
//! out one by one (`ClusterIndex::rejection`) and unpruned scores; the tests
//! hold the hot path to both.

use super::index::{ClusterIndex, GroupIndex, HOST, RACK, ZONE};
use super::{
    Attempt, BytesAtDistance, CandidateNote, CapacityFit, Explain, HolderNote, ImageNote, NoFit, Portion,
    RejectionCounts, Score, VmDecision, VmOutcome, VmRejection, VmRequest, DATA_POINTS, GROUP_RACK_PENALTY_POINTS,
    HEADROOM_POINTS, HOST_WEIGHT_PERMILLE, IMAGE_CACHED_POINTS, IMAGE_LOCAL_POINTS, MAX_DATASETS_PER_VM,
    MAX_HOLDERS_PER_NOTE, MAX_RETRY_AFTER_MS, RACK_WEIGHT_PERMILLE, SUMMARY_TOP_N, ZONE_WEIGHT_PERMILLE,
};
use crate::error::FileField;
use crate::util::{BitSet, FastMap};
use crate::{Level, PlacementError};

/// A request resolved against the index: everything the per-host loop
/// reads, computed once per decision.
struct Prepared<'a> {
    req: &'a VmRequest,
    /// File indices, de-duplicated, in request order.
    datasets: Vec<u32>,
    image: u32,
    unavailable: Option<Portion>,
    data: Parts,
    image_parts: Parts,
    cached: Option<&'a BitSet>,
    group: Option<&'a GroupIndex>,
    /// Per rack: points taken off for VMs of the request's group there
    /// (empty: the group runs nowhere yet).
    group_penalty: Vec<i64>,
}

/// Locality score points per domain, split so that a host's points are
/// `rack[r] + host[h]`.
///
/// Why this adds up: with cumulative bytes H ⊆ R ⊆ Z (bytes with a replica on
/// the host, in the rack, in the zone), the weighted sum
/// `wh·H + wr·(R−H) + wz·(Z−R)` equals `(wh−wr)·H + (wr−wz)·R + wz·Z`, one
/// term per level; a rack lies in one zone, so its entry carries the zone
/// term too.
#[derive(Default)]
struct Parts {
    rack: Vec<i64>,
    /// Host terms are sparse (only domains holding data): the bit set
    /// answers "none" for most hosts without a search.
    host_bits: BitSet,
    host: Vec<(u32, i64)>,
    /// Per rack: the largest host term in it, for score bounds.
    host_max: Vec<i64>,
}

impl Parts {
    fn build(index: &ClusterIndex, files: &[u32], points: i64) -> Parts {
        let total = files.iter().fold(0u64, |t, &f| t.saturating_add(index.files[f as usize].bytes));
        if total == 0 {
            return Parts::default();
        }
        let mut zone = vec![0u64; index.domain_counts[ZONE]];
        let mut rack = vec![0u64; index.domain_counts[RACK]];
        let mut host: Vec<(u32, u64)> = Vec::new();
        for &f in files {
            let levels = &index.files[f as usize].levels;
            for e in &levels[ZONE].entries {
                let b = &mut zone[e.domain as usize];
                *b = b.saturating_add(e.bytes);
            }
            for e in &levels[RACK].entries {
                let b = &mut rack[e.domain as usize];
                *b = b.saturating_add(e.bytes);
            }
            host.extend(levels[HOST].entries.iter().map(|e| (e.domain, e.bytes)));
        }
        if files.len() > 1 {
            // One file's entries are sorted already; several need merging.
            host.sort_unstable_by_key(|&(d, _)| d);
            host.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 = kept.1.saturating_add(later.1);
                }
                same
            });
        }
        let to_points = |bytes: u64, weight_permille: i64| -> i64 {
            let scale = (weight_permille * points) as u64;
            match (bytes.checked_mul(scale), total.checked_mul(1000)) {
                _ if bytes == 0 => 0,
                (Some(n), Some(d)) => (n / d) as i64,
                // Data sets beyond ~18 GB: the same quotient, computed wider.
                _ => (u128::from(bytes) * u128::from(scale) / (1000 * u128::from(total))) as i64,
            }
        };
        let zone: Vec<i64> = zone.into_iter().map(|b| to_points(b, ZONE_WEIGHT_PERMILLE)).collect();
        let rack = rack
            .into_iter()
            .enumerate()
            .map(|(r, b)| to_points(b, RACK_WEIGHT_PERMILLE - ZONE_WEIGHT_PERMILLE) + zone[index.rack_zone[r] as usize])
            .collect();
        let host: Vec<(u32, i64)> =
            host.into_iter().map(|(d, b)| (d, to_points(b, HOST_WEIGHT_PERMILLE - RACK_WEIGHT_PERMILLE))).collect();
        let mut host_bits = BitSet::with_len(index.domain_counts[HOST]);
        let mut host_max = vec![0i64; index.domain_counts[RACK]];
        for &(d, points) in &host {
            host_bits.insert(d as usize);
            let m = &mut host_max[index.host_domain_rack[d as usize] as usize];
            *m = (*m).max(points);
        }
        Parts { rack, host_bits, host, host_max }
    }

    #[inline]
    fn host_term(&self, host_domain: u32) -> i64 {
        if self.host_bits.contains(host_domain as usize) {
            self.host.binary_search_by_key(&host_domain, |&(d, _)| d).map_or(0, |i| self.host[i].1)
        } else {
            0
        }
    }

    #[inline]
    fn get(&self, dom: [u32; 3]) -> i64 {
        self.rack.get(dom[RACK] as usize).copied().unwrap_or(0) + self.host_term(dom[HOST])
    }

    /// The most any host in `rack` can get.
    fn bound(&self, rack: u32) -> i64 {
        let r = rack as usize;
        self.rack.get(r).copied().unwrap_or(0) + self.host_max.get(r).copied().unwrap_or(0)
    }
}

/// Host groups (racks) visited in order of their score bound before the
/// rest are visited in index order.
const BEST_GROUPS_FIRST: usize = 8;

/// Which hosts are close enough to the data at one level.
enum Qualifying {
    All,
    /// Domains at the level that hold every chunk of every data set.
    Domains {
        level: usize,
        domains: Vec<u32>,
    },
}

/// What one pass over the candidate hosts found.
struct Scan {
    counts: RejectionCounts,
    /// Best qualifying hosts, best first: (score, host index).
    top: Vec<(i64, u32)>,
    /// Some rejected hosts that were visited, lowest index first.
    sample: Vec<u32>,
}

/// Whether `a` ranks before `b`: higher score, then lower index (= lower id).
fn ranks_before(a: (i64, u32), b: (i64, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

impl ClusterIndex {
    /// Decides where `request` runs.
    ///
    /// Tries the required level; if no host qualifies there and
    /// `waited_ms < policy.max_wait_ms`, answers `Wait`. Otherwise widens one
    /// level at a time up to `policy.relax_to` and places at the first level
    /// where a host qualifies, or answers `Unplaceable` with the reason at
    /// the widest level tried.
    pub fn place(&self, request: &VmRequest, explain: Explain) -> Result<VmDecision, PlacementError> {
        let p = self.prepare(request)?;
        let keep = match explain {
            Explain::Summary => SUMMARY_TOP_N,
            // Every host gets a note anyway; the scan need only find the best.
            Explain::Full => 1,
        };
        let mut attempts = Vec::new();
        let mut level = request.proximity;
        loop {
            let scan = self.scan(&p, level, keep);
            attempts.push(Attempt { level, counts: scan.counts.clone() });
            let outcome = if let Some(&(_, best)) = scan.top.first() {
                VmOutcome::Placed {
                    host: self.view.hosts[best as usize].id,
                    relaxed_to: (level != request.proximity).then_some(level),
                }
            } else if level == request.proximity && request.waited_ms < request.policy.max_wait_ms {
                VmOutcome::Wait {
                    retry_after_ms: (request.policy.max_wait_ms - request.waited_ms).min(MAX_RETRY_AFTER_MS),
                    reason: self.no_fit(&p, level, &scan),
                }
            } else if let Some(wider) = level.wider().filter(|&w| w <= request.policy.relax_to) {
                level = wider;
                continue;
            } else {
                VmOutcome::Unplaceable { reason: self.no_fit(&p, level, &scan) }
            };
            let chosen = scan.top.first().map(|&(_, i)| i);
            let candidates = self.notes(&p, level, &scan, explain, chosen);
            return Ok(VmDecision { vm: request.name.clone(), outcome, attempts, candidates });
        }
    }

    /// Places `requests` one after another, higher `priority` first (then by
    /// name), committing each placement so later requests see it. Results
    /// come in that order; a malformed request yields its error and the
    /// batch goes on.
    pub fn place_many(&mut self, requests: &[VmRequest], explain: Explain) -> Vec<Result<VmDecision, PlacementError>> {
        let mut order: Vec<&VmRequest> = requests.iter().collect();
        order.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.name.cmp(&b.name)));
        order
            .into_iter()
            .map(|r| {
                let decision = self.place(r, explain)?;
                if let Some(host) = decision.outcome.host() {
                    self.commit(r, host)?;
                }
                Ok(decision)
            })
            .collect()
    }

    fn prepare<'a>(&'a self, req: &'a VmRequest) -> Result<Prepared<'a>, PlacementError> {
        if req.vcpus == 0 {
            return Err(PlacementError::ZeroVcpus { vm: req.name.clone() });
        }
        if req.mem_mb == 0 {
            return Err(PlacementError::ZeroMemory { vm: req.name.clone() });
        }
        if req.datasets.len() > MAX_DATASETS_PER_VM {
            return Err(PlacementError::TooManyDatasets { vm: req.name.clone(), count: req.datasets.len() });
        }
        let file = |path: &String, field| {
            self.file_by_path.get(path).copied().ok_or_else(|| PlacementError::UnknownFile {
                vm: req.name.clone(),
                field,
                path: path.clone(),
            })
        };
        let image = file(&req.image, FileField::Image)?;
        let mut datasets = Vec::with_capacity(req.datasets.len());
        for path in &req.datasets {
            let f = file(path, FileField::Datasets)?;
            if !datasets.contains(&f) {
                datasets.push(f);
            }
        }
        let unavailable = datasets.iter().find_map(|&f| {
            let file = &self.files[f as usize];
            file.first_lost.map(|chunk_index| Portion { path: file.path.clone(), chunk_index })
        });
        let group = req.anti_affinity.as_ref().and_then(|g| self.groups.get(g));
        let mut group_penalty = Vec::new();
        if let Some(g) = group.filter(|g| !g.per_rack.is_empty()) {
            group_penalty = vec![0; self.domain_counts[RACK]];
            for (&rack, &count) in &g.per_rack {
                group_penalty[rack as usize] = i64::from(count) * GROUP_RACK_PENALTY_POINTS;
            }
        }
        Ok(Prepared {
            req,
            data: Parts::build(self, &datasets, DATA_POINTS),
            image_parts: Parts::build(self, &[image], IMAGE_LOCAL_POINTS),
            datasets,
            image,
            unavailable,
            cached: self.images.get(&req.image),
            group,
            group_penalty,
        })
    }

    fn qualifying(&self, p: &Prepared<'_>, level: Level) -> Qualifying {
        let Some(l) = level.domain_index() else {
            return Qualifying::All;
        };
        // An empty file is within any distance.
        let mut files = p.datasets.iter().map(|&f| &self.files[f as usize]).filter(|f| f.chunks > 0);
        let Some(first) = files.next() else {
            return Qualifying::All;
        };
        let mut domains = first.levels[l].full.clone();
        for f in files {
            domains.retain(|d| f.levels[l].full.binary_search(d).is_ok());
        }
        Qualifying::Domains { level: l, domains }
    }

    /// Visits the hosts close enough to the data, rack by rack, best score
    /// bound first. Once the top list is full, a rack whose bound cannot
    /// beat its last entry is only counted, not scored: that is what keeps
    /// wide levels cheap when the data has a home.
    fn scan(&self, p: &Prepared<'_>, level: Level, keep: usize) -> Scan {
        let mut scan = Scan { counts: RejectionCounts::default(), top: Vec::new(), sample: Vec::new() };
        let image_bound = |rack: u32| {
            let near = p.image_parts.bound(rack);
            if p.cached.is_some() {
                near.max(IMAGE_CACHED_POINTS)
            } else {
                near
            }
        };
        let bound = |rack: u32, data: i64| {
            data + image_bound(rack) + HEADROOM_POINTS - p.group_penalty.get(rack as usize).copied().unwrap_or(0)
        };
        let rack_group =
            |rack: u32| (bound(rack, p.data.bound(rack)), &self.hosts_in[RACK][rack as usize][..], Some(rack));
        let qualifying = self.qualifying(p, level);
        let mut groups: Vec<(i64, &[u32], Option<u32>)> = match &qualifying {
            Qualifying::All => (0..self.domain_counts[RACK] as u32).map(rack_group).collect(),
            Qualifying::Domains { level: ZONE, domains } => {
                domains.iter().flat_map(|&z| self.racks_in_zone[z as usize].iter().copied()).map(rack_group).collect()
            }
            Qualifying::Domains { level: RACK, domains } => domains.iter().copied().map(rack_group).collect(),
            Qualifying::Domains { domains, .. } => domains
                .iter()
                .map(|&d| {
                    let rack = self.host_domain_rack[d as usize];
                    let data = p.data.rack.get(rack as usize).copied().unwrap_or(0) + p.data.host_term(d);
                    (bound(rack, data), &self.hosts_in[HOST][d as usize][..], None)
                })
                .collect(),
        };
        groups.retain(|(_, hosts, _)| !hosts.is_empty());
        // Only speed depends on this order, never the result: the best few
        // groups first fill the top list, after which most others are
        // hopeless. Selecting them costs O(groups); a full sort would not.
        let by_bound = |a: &(i64, &[u32], Option<u32>), b: &(i64, &[u32], Option<u32>)| b.0.cmp(&a.0);
        if groups.len() > BEST_GROUPS_FIRST {
            groups.select_nth_unstable_by(BEST_GROUPS_FIRST, by_bound);
        }
        let first = groups.len().min(BEST_GROUPS_FIRST);
        groups[..first].sort_unstable_by(by_bound);

        let mut visited = 0u32;
        for (bound, hosts, rack) in groups {
            let hopeless = scan.top.len() == keep && scan.top.last().is_some_and(|&(s, _)| bound < s);
            visited += hosts.len() as u32;
            // A hopeless rack where every host is healthy, fits and holds no
            // VM of the group: all of them qualify, none can enter the top
            // list; count them without visiting.
            if let (true, Some(r)) = (hopeless, rack) {
                let r = r as usize;
                let all_fit = self.rack_unhealthy[r] == 0
                    && self.rack_min_free_vcpus[r] >= p.req.vcpus
                    && self.rack_min_free_mem_mb[r] >= p.req.mem_mb
                    && p.group.is_none_or(|g| g.per_rack.get(&(r as u32)).is_none_or(|&c| c == 0));
                if all_fit {
                    scan.counts.qualified += hosts.len() as u32;
                    continue;
                }
            }
            for &i in hosts {
                self.visit(p, i, keep, !hopeless, &mut scan);
            }
        }
        if let Qualifying::Domains { .. } = qualifying {
            // Hosts not visited are too far, unless unhealthy (which comes
            // first), and the unhealthy total is known.
            let unhealthy_elsewhere = self.unhealthy_hosts - scan.counts.unhealthy;
            scan.counts.unhealthy += unhealthy_elsewhere;
            scan.counts.too_far = self.view.hosts.len() as u32 - visited - unhealthy_elsewhere;
        }
        scan
    }

    /// Checks one host that is close enough to the data, in the order of
    /// [`RejectionCounts`]; scores it if it fits and `score_it`.
    #[inline]
    fn visit(&self, p: &Prepared<'_>, i: u32, keep: usize, score_it: bool, scan: &mut Scan) {
        let h = &self.hosts;
        let iu = i as usize;
        let c = &mut scan.counts;
        let rejected = if !h.healthy[iu] {
            &mut c.unhealthy
        } else if h.free_vcpus[iu] < p.req.vcpus {
            &mut c.no_cpu
        } else if h.free_mem_mb[iu] < p.req.mem_mb {
            &mut c.no_memory
        } else if p.group.is_some_and(|g| g.members.contains(iu)) {
            &mut c.anti_affinity
        } else {
            c.qualified += 1;
            if score_it {
                let entry = (self.score(p, iu).total, i);
                let top = &mut scan.top;
                if top.len() < keep || top.last().is_some_and(|&last| ranks_before(entry, last)) {
                    let at = top.iter().position(|&t| ranks_before(entry, t)).unwrap_or(top.len());
                    top.insert(at, entry);
                    top.truncate(keep);
                }
            }
            return;
        };
        *rejected += 1;
        if keep > 1 {
            let sample = &mut scan.sample;
            if sample.len() < keep {
                sample.push(i);
            } else if let Some(max) = sample.iter_mut().max().filter(|m| **m > i) {
                *max = i;
            }
        }
    }

    /// A fitting host's score.
    #[inline(always)]
    fn score(&self, p: &Prepared<'_>, i: usize) -> Score {
        let h = &self.hosts;
        let dom = h.dom[i];
        let data = p.data.get(dom);
        let image = if p.cached.is_some_and(|c| c.contains(i)) { IMAGE_CACHED_POINTS } else { p.image_parts.get(dom) };
        // Float only for the ratio; the result is truncated to whole points,
        // and IEEE arithmetic without fused operations is deterministic.
        let headroom = (f64::from(h.free_vcpus[i] - p.req.vcpus) * h.headroom_per_vcpu[i]
            + (h.free_mem_mb[i] - p.req.mem_mb) as f64 * h.headroom_per_mem_mb[i]) as i64;
        let group_penalty = p.group_penalty.get(dom[RACK] as usize).copied().unwrap_or(0);
        Score { data, image, headroom, group_penalty, total: data + image + headroom - group_penalty }
    }

    fn no_fit(&self, p: &Prepared<'_>, level: Level, scan: &Scan) -> NoFit {
        NoFit {
            level,
            counts: scan.counts.clone(),
            unavailable: if level < Level::Any { p.unavailable.clone() } else { None },
        }
    }

    /// Why host `i` does not qualify at `level`, if it does not. Written
    /// rule by rule, independently of the scan's domain intersection.
    fn rejection(&self, p: &Prepared<'_>, level: Level, i: usize) -> Option<VmRejection> {
        let h = &self.hosts;
        if !h.healthy[i] {
            return Some(VmRejection::Unhealthy);
        }
        if let Some(l) = level.domain_index() {
            let d = h.dom[i][l];
            for &f in &p.datasets {
                let file = &self.files[f as usize];
                let (chunks, bytes) = file.levels[l].get(d).map_or((0, 0), |e| (e.chunks, e.bytes));
                if chunks < file.chunks {
                    return Some(VmRejection::TooFar {
                        level,
                        portion: Portion { path: file.path.clone(), chunk_index: file.levels[l].first_missing(d) },
                        missing_chunks: file.chunks - chunks,
                        missing_bytes: file.bytes - bytes,
                    });
                }
            }
        }
        if h.free_vcpus[i] < p.req.vcpus {
            return Some(VmRejection::NoCpu { free_vcpus: h.free_vcpus[i], needed_vcpus: p.req.vcpus });
        }
        if h.free_mem_mb[i] < p.req.mem_mb {
            return Some(VmRejection::NoMemory { free_mem_mb: h.free_mem_mb[i], needed_mem_mb: p.req.mem_mb });
        }
        if let Some(group) = &p.req.anti_affinity {
            let count = self.view.hosts[i].groups.get(group).copied().unwrap_or(0);
            if count > 0 {
                return Some(VmRejection::AntiAffinity { group: group.clone(), count });
            }
        }
        None
    }

    fn notes(
        &self,
        p: &Prepared<'_>,
        level: Level,
        scan: &Scan,
        explain: Explain,
        chosen: Option<u32>,
    ) -> Vec<CandidateNote> {
        let n = self.view.hosts.len() as u32;
        let hosts: Vec<u32> = match explain {
            Explain::Full => (0..n).collect(),
            Explain::Summary => {
                let mut hosts: Vec<u32> = scan.top.iter().map(|&(_, i)| i).collect();
                let mut sample = scan.sample.clone();
                sample.sort_unstable();
                hosts.extend(sample);
                hosts.truncate(SUMMARY_TOP_N);
                // Too few visited hosts: show some far ones, whose notes
                // say which portion is out of reach.
                let mut next = 0;
                while hosts.len() < SUMMARY_TOP_N && next < n {
                    if !hosts.contains(&next) {
                        hosts.push(next);
                    }
                    next += 1;
                }
                hosts
            }
        };
        let holders = self.request_holders(p);
        let mut notes: Vec<CandidateNote> =
            hosts.into_iter().map(|i| self.note(p, level, i as usize, chosen == Some(i), &holders)).collect();
        notes.sort_by_key(|note| {
            (!note.chosen, note.rejection.is_some(), note.score.as_ref().map(|s| -s.total), note.host)
        });
        notes
    }

    fn note(&self, p: &Prepared<'_>, level: Level, i: usize, chosen: bool, holders: &[(u32, u64)]) -> CandidateNote {
        let host = &self.view.hosts[i];
        let dom = self.hosts.dom[i];
        let rejection = self.rejection(p, level, i);
        let mut near: Vec<HolderNote> = holders
            .iter()
            .map(|&(n, bytes)| {
                let node = &self.nodes[n as usize];
                HolderNote { server: node.id, distance: distance(dom, node.dom), bytes }
            })
            .collect();
        let nearest_first = |h: &HolderNote| (h.distance, h.server);
        if near.len() > MAX_HOLDERS_PER_NOTE {
            near.select_nth_unstable_by_key(MAX_HOLDERS_PER_NOTE, nearest_first);
            near.truncate(MAX_HOLDERS_PER_NOTE);
        }
        near.sort_unstable_by_key(nearest_first);
        let signed = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        CandidateNote {
            host: host.id,
            name: host.name.clone(),
            level,
            chosen,
            data: self.bytes_at(&p.datasets, dom),
            image: ImageNote { cached: p.cached.is_some_and(|c| c.contains(i)), bytes: self.bytes_at(&[p.image], dom) },
            holders: near,
            fit: CapacityFit {
                vcpus_after: i64::from(self.hosts.free_vcpus[i]) - i64::from(p.req.vcpus),
                mem_mb_after: signed(self.hosts.free_mem_mb[i]) - signed(p.req.mem_mb),
            },
            score: rejection.is_none().then(|| self.score(p, i)),
            rejection,
        }
    }

    /// Bytes of `files` by the distance of their nearest healthy replica
    /// from a host in domains `dom`.
    fn bytes_at(&self, files: &[u32], dom: [u32; 3]) -> BytesAtDistance {
        let (mut total, mut lost, mut cumulative) = (0u64, 0u64, [0u64; 3]);
        for &f in files {
            let file = &self.files[f as usize];
            total = total.saturating_add(file.bytes);
            lost = lost.saturating_add(file.lost_bytes);
            for (l, c) in cumulative.iter_mut().enumerate() {
                *c = c.saturating_add(file.levels[l].get(dom[l]).map_or(0, |e| e.bytes));
            }
        }
        let [host, rack, zone] = cumulative;
        // Saturating only matters for byte counts near u64::MAX; otherwise
        // host <= rack <= zone <= total - lost holds by construction.
        BytesAtDistance {
            host_bytes: host,
            rack_bytes: rack.saturating_sub(host),
            zone_bytes: zone.saturating_sub(rack),
            remote_bytes: total.saturating_sub(lost).saturating_sub(zone),
            unavailable_bytes: lost,
        }
    }

    /// Storage nodes holding data set portions, with the bytes each holds.
    fn request_holders(&self, p: &Prepared<'_>) -> Vec<(u32, u64)> {
        if let [only] = p.datasets[..] {
            return self.files[only as usize].holders.clone();
        }
        let mut merged: FastMap<u32, u64> = FastMap::default();
        for &f in &p.datasets {
            for &(n, bytes) in &self.files[f as usize].holders {
                let b = merged.entry(n).or_insert(0);
                *b = b.saturating_add(bytes);
            }
        }
        let mut merged: Vec<(u32, u64)> = merged.into_iter().collect();
        merged.sort_unstable();
        merged
    }
}

/// Distance between two places given as interned domain ids. Ids are
/// hierarchical, so equal host ids imply equal racks and zones.
fn distance(a: [u32; 3], b: [u32; 3]) -> Level {
    if a[HOST] == b[HOST] {
        Level::Host
    } else if a[RACK] == b[RACK] {
        Level::Rack
    } else if a[ZONE] == b[ZONE] {
        Level::Zone
    } else {
        Level::Any
    }
}
