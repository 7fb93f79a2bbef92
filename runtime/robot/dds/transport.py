"""CycloneDDS plumbing shared by the link and the simulator: the XML config, one Domain per id, raw sample I/O.

Raw I/O: we hand cyclonedds' C writer the XCDR1 bytes we built ourselves (wire.py) and take received samples as
bytes, skipping the Python IdlStruct (de)serializer (150-320 us and hundreds of objects per message). This uses
``cyclonedds._clayer.ddspy_write`` / ``ddspy_take``, internals of the pinned cyclonedds==0.10.2 that its own
DataWriter.write / DataReader.take call with exactly these arguments; tests check the bytes against cyclonedds'
serializer and round-trip through real readers and writers.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

from cyclonedds._clayer import ddspy_take, ddspy_write
from cyclonedds.core import DDSException
from cyclonedds.domain import Domain, DomainParticipant
from cyclonedds.pub import DataWriter
from cyclonedds.qos import Policy, Qos
from cyclonedds.sub import DataReader
from cyclonedds.topic import Topic
from cyclonedds.util import duration

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


_domains: Dict[int, Tuple[str, Domain]] = {}
_domains_lock = threading.Lock()


def open_participant(domain_id: int, interface: Optional[str] = None,
                     loopback: Optional[bool] = None) -> DomainParticipant:
    """A participant on ``domain_id``, its Domain created once per process with our config.

    ``loopback`` None = loopback when ``interface`` is "lo". A process holds one config per domain id (CycloneDDS
    creates a domain once); asking for another config on the same id is an error rather than a silent mismatch.
    """
    if loopback is None:
        loopback = interface in ("lo", "lo0")
    config = dds_config_xml(interface, loopback)
    with _domains_lock:
        held = _domains.get(domain_id)
        if held is None:
            _domains[domain_id] = (config, Domain(domain_id, config))
        elif held[0] != config:
            raise ValueError("DDS domain {} is already open in this process with another interface config".format(
                domain_id))
    return DomainParticipant(domain_id)


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
    """Delete DDS entities now rather than at garbage collection; idempotent (cyclonedds' own __del__ is)."""
    for entity in entities:
        try:
            entity.__del__()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
