//! Cluster-wide alarms (NOSPACE, CORRUPT), raised and cleared through raft so that every member
//! holds the same set; persisted as auxiliary backend records.
//!
//! While NOSPACE is on, writes that add data (puts, transactions with puts, lease grants) fail;
//! reads, deletes, compaction and defragmentation still work. While CORRUPT is on, every write
//! fails. Owns the alarm set only; the applier asks it before applying a write.

use keel_mvcc::Store;
use keel_proto::etcdserverpb::{AlarmMember, AlarmType};
use std::collections::BTreeSet;

pub const AUX_PREFIX: &str = "alarm/";

#[derive(Debug, Default)]
pub struct Alarms {
    set: BTreeSet<(u64, i32)>,
}

pub fn aux_key(member: u64, alarm: i32) -> String {
    format!("{AUX_PREFIX}{member:016x}/{alarm}")
}

impl Alarms {
    pub fn load(store: &Store) -> Alarms {
        let mut set = BTreeSet::new();
        for (name, _) in store.aux_prefix(AUX_PREFIX) {
            let rest = &name[AUX_PREFIX.len()..];
            if let Some((m, a)) = rest.split_once('/') {
                if let (Ok(m), Ok(a)) = (u64::from_str_radix(m, 16), a.parse::<i32>()) {
                    set.insert((m, a));
                }
            }
        }
        Alarms { set }
    }

    /// Alarms of type `alarm` (all of them for NONE), by member.
    pub fn get(&self, alarm: i32) -> Vec<AlarmMember> {
        self.set
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None as i32 || *a == alarm)
            .map(|&(m, a)| AlarmMember { member_id: m, alarm: a })
            .collect()
    }

    pub fn has(&self, alarm: AlarmType) -> bool {
        self.set.iter().any(|(_, a)| *a == alarm as i32)
    }

    /// Raises an alarm; returns it (None for NONE or an unknown type).
    pub fn activate(&mut self, store: &mut Store, member: u64, alarm: i32) -> Option<AlarmMember> {
        if !matches!(AlarmType::try_from(alarm), Ok(AlarmType::Nospace | AlarmType::Corrupt)) {
            return None;
        }
        if self.set.insert((member, alarm)) {
            store.set_aux(&aux_key(member, alarm), vec![1]);
            let name = AlarmType::try_from(alarm).map(|a| a.as_str_name()).unwrap_or("?");
            tracing::warn!(alarm = name, from = format!("{member:x}"), "alarm raised");
        }
        Some(AlarmMember { member_id: member, alarm })
    }

    /// Clears an alarm; returns it if it was raised.
    pub fn deactivate(&mut self, store: &mut Store, member: u64, alarm: i32) -> Option<AlarmMember> {
        if !self.set.remove(&(member, alarm)) {
            return None;
        }
        store.delete_aux(&aux_key(member, alarm));
        let name = AlarmType::try_from(alarm).map(|a| a.as_str_name()).unwrap_or("?");
        tracing::warn!(alarm = name, from = format!("{member:x}"), "alarm disarmed");
        Some(AlarmMember { member_id: member, alarm })
    }
}
