//! An in-memory map store with capacities and an operation log, for tests.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{capacity, filter, maps, BackendValue, Config, ServiceKey, ServiceValue};

use super::{MapError, MapStore, SourceRange};

#[derive(Debug, Clone)]
pub struct MemoryMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: Vec<u32>,
    pub node_addresses: Vec<u32>,
    pub config: Option<Config>,
    pub source_ranges: BTreeSet<SourceRange>,
    /// FRONT_FILTER's words, zero (filtering nothing) until written, as a new map is.
    pub filter: Vec<u64>,
    /// SVC_GEN by service id.
    pub generations: Vec<u32>,
    pub service_capacity: usize,
    pub backend_capacity: usize,
    pub source_range_capacity: usize,
    /// Every write in order: ("put_service", ...), for checking the order of changes.
    pub log: Vec<String>,
}

impl Default for MemoryMaps {
    fn default() -> Self {
        Self::with_capacity(capacity::SERVICES as usize, 1 << 16)
    }
}

impl MemoryMaps {
    pub fn with_capacity(services: usize, maglev: usize) -> Self {
        Self {
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            maglev: vec![0; maglev],
            node_addresses: Vec::new(),
            config: None,
            source_ranges: BTreeSet::new(),
            filter: vec![0; filter::WORDS as usize],
            generations: vec![0; capacity::SERVICE_STATS as usize],
            service_capacity: services,
            backend_capacity: capacity::BACKENDS as usize,
            source_range_capacity: capacity::SOURCE_RANGES as usize,
            log: Vec::new(),
        }
    }

    /// What the data path's filter answers for a tuple (wire order): false when the packet
    /// would pass without a lookup.
    pub fn maybe_frontend(&self, addr: u32, port: u16, proto: u8) -> bool {
        let (word, bit) = filter::position(filter::slot(addr, port, proto));
        self.filter[word as usize] & bit == 0
    }
}

impl MapStore for MemoryMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn node_addresses(&self) -> Result<Vec<u32>, MapError> {
        Ok(self.node_addresses.clone())
    }
    fn maglev(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapError> {
        let (o, l) = (offset as usize, len as usize);
        self.maglev
            .get(o..o + l)
            .map(<[u32]>::to_vec)
            .ok_or_else(|| MapError::Other("maglev range out of bounds".into()))
    }
    fn config(&self) -> Result<Option<Config>, MapError> {
        Ok(self.config)
    }
    fn source_ranges(&self) -> Result<Vec<SourceRange>, MapError> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        if !self.services.contains_key(&key) && self.services.len() >= self.service_capacity {
            return Err(MapError::Full(maps::SERVICES));
        }
        self.log.push(format!("put_service {key:?}"));
        self.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.log.push(format!("delete_service {key:?}"));
        self.services.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<(), MapError> {
        if !self.backends.contains_key(&id) && self.backends.len() >= self.backend_capacity {
            return Err(MapError::Full(maps::BACKENDS));
        }
        self.log.push(format!("put_backend {id}"));
        self.backends.insert(id, value);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.log.push(format!("delete_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn write_maglev(&mut self, offset: u32, ids: &[u32]) -> Result<(), MapError> {
        let o = offset as usize;
        let slots = self
            .maglev
            .get_mut(o..o + ids.len())
            .ok_or(MapError::Full(maps::MAGLEV))?;
        slots.copy_from_slice(ids);
        self.log
            .push(format!("write_maglev {offset}+{}", ids.len()));
        Ok(())
    }
    fn write_filter(&mut self, index: u32, words: &[u64]) -> Result<(), MapError> {
        let i = index as usize;
        self.filter
            .get_mut(i..i + words.len())
            .ok_or(MapError::Full(maps::FRONTEND_FILTER))?
            .copy_from_slice(words);
        self.log
            .push(format!("write_filter {index}+{}", words.len()));
        Ok(())
    }
    fn next_generation(&mut self, id: u32) -> Result<(), MapError> {
        let g = self
            .generations
            .get_mut(id as usize)
            .ok_or(MapError::Full(maps::SERVICE_GENERATIONS))?;
        *g = g.wrapping_add(1);
        self.log.push(format!("next_generation {id}"));
        Ok(())
    }
    fn put_node_address(&mut self, addr: u32) -> Result<(), MapError> {
        self.log.push(format!("put_node_address {addr}"));
        if !self.node_addresses.contains(&addr) {
            self.node_addresses.push(addr);
        }
        Ok(())
    }
    fn delete_node_address(&mut self, addr: u32) -> Result<(), MapError> {
        self.log.push(format!("delete_node_address {addr}"));
        self.node_addresses.retain(|a| *a != addr);
        Ok(())
    }
    fn put_config(&mut self, config: Config) -> Result<(), MapError> {
        self.config = Some(config);
        Ok(())
    }
    fn put_source_range(&mut self, range: SourceRange) -> Result<(), MapError> {
        if !self.source_ranges.contains(&range)
            && self.source_ranges.len() >= self.source_range_capacity
        {
            return Err(MapError::Full(maps::SOURCE_RANGES));
        }
        self.log
            .push(format!("put_source_range {}", range.service_id));
        self.source_ranges.insert(range);
        Ok(())
    }
    fn delete_source_range(&mut self, range: &SourceRange) -> Result<(), MapError> {
        self.log
            .push(format!("delete_source_range {}", range.service_id));
        self.source_ranges.remove(range);
        Ok(())
    }
    fn reset_service_counters(&mut self, ids: &[u32]) -> Result<(), MapError> {
        for id in ids {
            self.log.push(format!("reset_service_counters {id}"));
        }
        Ok(())
    }
}
