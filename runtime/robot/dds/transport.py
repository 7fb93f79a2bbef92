"""CycloneDDS plumbing shared by the link and the simulator: the XML config, one Domain and one participant per id
and process (shared with unitree_sdk2py when it created the domain first), raw sample I/O.

Raw I/O: we hand cyclonedds' C writer the XCDR1 bytes we built ourselves (cdr_buffers.py) and take received samples as
bytes, skipping the Python IdlStruct (de)serializer (150-320 us and hundreds of objects per message). This uses
``cyclonedds._clayer.ddspy_write`` / ``ddspy_take``, internals of the pinned cyclonedds==0.10.2 that its own
DataWriter.write / DataReader.take call with exactly these arguments; tests check the bytes against cyclonedds'
serializer and round-trip through real readers and writers.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, List, Optional

from cyclonedds._clayer import ddspy_take, ddspy_write
from cyclonedds.core import DDSException
from cyclonedds.domain import Domain, DomainParticipant
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy, Qos
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration

log = logging.getLogger("wam_edge.dds")

LOWCMD_TOPIC = "rt/lowcmd"
ARM_SDK_TOPIC = "rt/arm_sdk"
LOWSTATE_TOPIC = "rt/lowstate"


def dds_config_xml(interface: Optional[str] = None, loopback: bool = False) -> str:
    """The CycloneDDS XML config, like Unitree's SDK builds it: one named network interface, or autodetermine.

    ``loopback``: 127.0.0.1 only, multicast off, unicast discovery to peer 127.0.0.1 (loopback is not
    multicast-capable, so the default config would warn and fail to discover). The domain id is given to
    ``Domain()`` (the XML says Id="any").
    """
    if loopback:
        general = ('<Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces>'
                   "<AllowMulticast>false</AllowMulticast>")
        discovery = ("<Discovery><ParticipantIndex>auto</ParticipantIndex>"
                     "<MaxAutoParticipantIndex>40</MaxAutoParticipantIndex>"
                     '<Peers><Peer address="127.0.0.1"/></Peers></Discovery>')
    elif interface:
        general = ('<Interfaces><NetworkInterface name="{}" priority="default" multicast="default"/>'
                   "</Interfaces>").format(_xml_attr(interface))
        discovery = ""
    else:
        general = ""  # CycloneDDS picks an interface itself
        discovery = ""
    return ('<?xml version="1.0" encoding="UTF-8" ?><CycloneDDS><Domain Id="any"><General>{}</General>{}'
            "</Domain></CycloneDDS>").format(general, discovery)


def _xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


class DomainConflict(ValueError):
    """A DDS domain is already open in this process on another network interface than the one asked for."""


#: Who created a domain, when it was this module.
WAM_EDGE = "wam-edge"
#: The interface of a domain that other code created without telling us (adopt_domain).
UNKNOWN = "unknown"


class _Shared:
    """One domain id in this process: who created its Domain, on which interface, and the one participant on it."""

    __slots__ = ("creator", "interface", "config", "domain", "participant")

    def __init__(self, creator: str, interface: Optional[str], config: Optional[str] = None,
                 domain: Optional[Domain] = None) -> None:
        self.creator = creator
        self.interface = interface  # a name, None (CycloneDDS chooses) or UNKNOWN
        self.config = config  # our XML when we created the domain, else None
        self.domain = domain
        self.participant: Optional[DomainParticipant] = None


_domains: Dict[int, _Shared] = {}
_domains_lock = threading.Lock()


def adopt_domain(domain_id: int, interface: Optional[str], creator: str) -> None:
    """Record that ``creator`` (unitree_sdk2py's ChannelFactoryInitialize) has created ``domain_id`` in this process
    with a config naming ``interface`` (None or "": chosen automatically). open_participant then shares that domain
    and its participant, and refuses (DomainConflict) a link that asks for another interface."""
    want = interface or None
    with _domains_lock:
        held = _domains.get(domain_id)
        if held is None or held.interface == UNKNOWN:
            _domains[domain_id] = _Shared(creator, want)
            if held is not None:
                _domains[domain_id].participant = held.participant
        elif held.interface != want:
            raise DomainConflict(_conflict(domain_id, held, creator, want))


def domain_creator(domain_id: int) -> Optional[str]:
    """Who created ``domain_id`` in this process, or None when it is not open here."""
    with _domains_lock:
        held = _domains.get(domain_id)
    if held is not None:
        return held.creator
    return "other code in this process" if _local_participants(domain_id) else None


def open_participant(domain_id: int, interface: Optional[str] = None,
                     loopback: Optional[bool] = None) -> DomainParticipant:
    """This process's one participant on ``domain_id``, shared by every link, simulator and monitor in it.

    CycloneDDS creates a domain once per process (a second ``Domain(id, config)`` fails with PRECONDITION_NOT_MET),
    so whoever comes first creates it: this function, with our config (``loopback`` None = loopback when
    ``interface`` is "lo"), or unitree_sdk2py's ChannelFactoryInitialize with its own (adopt_domain records it).
    Everyone after shares that domain and its first participant: never a second participant beside the SDK's.
    Raises DomainConflict, naming both sides, when the domain is open on another interface (or, ours, with another
    config); a domain other code created without adopt_domain is shared with a warning (its interface unknown).
    """
    if loopback is None:
        loopback = interface in ("lo", "lo0")
    want = interface or None
    config = dds_config_xml(interface, loopback)
    with _domains_lock:
        held = _domains.get(domain_id)
        if held is None:
            held = _domains[domain_id] = _create(domain_id, want, config)
        elif held.interface != UNKNOWN and (held.interface != want or held.config not in (None, config)):
            raise DomainConflict(_conflict(domain_id, held, WAM_EDGE, want))
        if held.participant is None:
            found = _local_participants(domain_id)
            held.participant = found[0] if found else DomainParticipant(domain_id)
        return held.participant


def _create(domain_id: int, want: Optional[str], config: str) -> _Shared:
    try:
        return _Shared(WAM_EDGE, want, config, Domain(domain_id, config))
    except DDSException as exc:
        if exc.code != DDSException.DDS_RETCODE_PRECONDITION_NOT_MET:
            raise
    log.warning("DDS domain %d was already created in this process by other code that did not say with which "
                "config: sharing it as it is, so its network interface cannot be checked against %s", domain_id,
                _describe(want))
    return _Shared("other code in this process", UNKNOWN)


def _describe(interface: Optional[str]) -> str:
    return "the interface CycloneDDS chooses" if interface is None else "interface {!r}".format(interface)


def _conflict(domain_id: int, held: _Shared, asker: str, want: Optional[str]) -> str:
    if held.interface == want:  # ours, the same interface, another config
        return ("DDS domain {} is already open in this process on {} with another config (loopback or not): one "
                "process has one config per domain".format(domain_id, _describe(want)))
    return ("DDS domain {} is already open in this process on {} (created by {}), but {} asks for {}: a process "
            "has one domain per id, so both must name the same network interface (dds.interface)".format(
                domain_id, _describe(held.interface), held.creator, asker, _describe(want)))


def _local_participants(domain_id: int) -> List[DomainParticipant]:
    """The participants Python code created on ``domain_id`` in this process (dds_lookup_participant)."""
    probe = Domain.__new__(Domain)  # not initialised: no dds_create_domain, only the lookup by id
    probe._id = domain_id
    try:
        return [p for p in probe.get_participants() if isinstance(p, DomainParticipant)]
    except DDSException:
        return []


def writer(participant: DomainParticipant, topic_name: str, data_type) -> DataWriter:
    """Reliable, keep-last-1 (the newest command is the only one that matters); matches any reader."""
    topic = Topic(participant, topic_name, data_type)
    qos = Qos(Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=10)), Policy.History.KeepLast(1))
    return DataWriter(participant, topic, qos=qos)


def reader(participant: DomainParticipant, topic_name: str, data_type, depth: int = 1) -> DataReader:
    """Best-effort (matches reliable and best-effort writers), keep-last ``depth``: never a growing queue."""
    topic = Topic(participant, topic_name, data_type)
    qos = Qos(Policy.Reliability.BestEffort, Policy.History.KeepLast(depth))
    return DataReader(participant, topic, qos=qos)


def write_raw(dds_writer: DataWriter, data) -> None:
    """Publish one already-serialized sample (encapsulation header + payload, any bytes-like)."""
    ret = ddspy_write(dds_writer._ref, data)
    if ret < 0:
        raise DDSException(ret, "writing a raw sample on {}".format(dds_writer.topic.name))


def take_raw(dds_reader: DataReader, n: int = 1) -> List[bytes]:
    """Take up to ``n`` samples as serialized bytes, oldest first; invalid samples (no data) dropped."""
    got = ddspy_take(dds_reader._ref, n)
    if isinstance(got, int):
        raise DDSException(got, "taking raw samples on {}".format(dds_reader.topic.name))
    return [data for data, info in got if info.valid_data]


def delete(*entities) -> None:
    """Delete DDS entities now rather than at garbage collection; idempotent (cyclonedds' own __del__ is).

    A participant open_participant handed out is skipped: others in this process (and the SDK) share it."""
    with _domains_lock:
        shared = [held.participant for held in _domains.values()]
    for entity in entities:
        if any(entity is p for p in shared):
            continue
        try:
            entity.__del__()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
