//! Resources as the scheduler counts them: cpu in cores, everything else in whole units.

/// The dimensions, in the order [`Resources::as_array`] gives them.
pub const DIMENSIONS: [&str; 5] = ["cpu", "memory", "disk", "network", "gpu"];

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    pub cpu: f64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
    pub gpu: u64,
}

/// Slack for adding up fractional cpus.
const CPU_EPSILON: f64 = 1e-9;

impl Resources {
    pub fn as_array(&self) -> [f64; 5] {
        [self.cpu, self.memory_mb as f64, self.disk_mb as f64, self.network_mbps as f64, self.gpu as f64]
    }

    pub fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory_mb += o.memory_mb;
        self.disk_mb += o.disk_mb;
        self.network_mbps += o.network_mbps;
        self.gpu += o.gpu;
    }

    /// Subtracts, stopping at zero.
    pub fn sub(&mut self, o: &Resources) {
        self.cpu = (self.cpu - o.cpu).max(0.0);
        self.memory_mb = self.memory_mb.saturating_sub(o.memory_mb);
        self.disk_mb = self.disk_mb.saturating_sub(o.disk_mb);
        self.network_mbps = self.network_mbps.saturating_sub(o.network_mbps);
        self.gpu = self.gpu.saturating_sub(o.gpu);
    }

    pub fn plus(mut self, o: &Resources) -> Resources {
        self.add(o);
        self
    }

    /// What is left of `self` after `used`.
    pub fn minus(mut self, used: &Resources) -> Resources {
        self.sub(used);
        self
    }

    /// The first dimension (index into [`DIMENSIONS`]) in which `need` exceeds `self`, if any.
    pub fn short_of(&self, need: &Resources) -> Option<usize> {
        if need.cpu > self.cpu + CPU_EPSILON {
            Some(0)
        } else if need.memory_mb > self.memory_mb {
            Some(1)
        } else if need.disk_mb > self.disk_mb {
            Some(2)
        } else if need.network_mbps > self.network_mbps {
            Some(3)
        } else if need.gpu > self.gpu {
            Some(4)
        } else {
            None
        }
    }

    /// Whether `need` fits in `self`.
    pub fn holds(&self, need: &Resources) -> bool {
        self.short_of(need).is_none()
    }

    /// The largest share `self` takes of `total` in any dimension `total` has (0 when it has none).
    pub fn dominant_share(&self, total: &Resources) -> f64 {
        let (mine, all) = (self.as_array(), total.as_array());
        (0..5).filter(|&d| all[d] > 0.0).map(|d| mine[d] / all[d]).fold(0.0, f64::max)
    }
}

/// One dimension's amount, for messages: "4096 MB of memory", "2.5 cpus".
pub fn describe(dimension: usize, amount: f64) -> String {
    match dimension {
        0 => format!("{amount} cpus"),
        1 => format!("{amount} MB of memory"),
        2 => format!("{amount} MB of disk"),
        3 => format!("{amount} Mbps of network"),
        _ => format!("{amount} gpus"),
    }
}
