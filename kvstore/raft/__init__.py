"""The Raft consensus core: a pure state machine with no I/O (see `kvstore.raft.node`).

Modules: `config` (RaftConfig), `node` (RawNode, Status), `log` (RaftLog: stable storage plus
the unstable tail), `progress` (Progress, Inflights), `quorum` (pure majority arithmetic),
`read_only` (ReadIndex bookkeeping), `types` (values), `storage` (the read-only Protocol),
`confchange` (membership changes: `node.propose_conf_change(ConfChange(...))`).

How a driver uses it (the simulator and the server do exactly this):

    node = RawNode(config, storage, random.Random(seed))
    loop:
        node.tick() every tick; node.step(message) for each message from a peer;
        node.propose(data) / context = node.read_index() for clients
        if node.has_ready():
            ready = node.ready()
            storage.save(ready.hard_state, ready.entries, ready.snapshot)   # fsync if must_sync
            send(ready.messages)                      # only after save returned
            apply ready.snapshot, then ready.committed_entries; serve ready.read_states once
            the applied index reaches each one's index
            node.advance(ready)                       # before the next ready()

What a user of the core must know:
- The applied index is tracked by the core: entries handed out in `committed_entries` count
  as applied at `advance()`. On restart pass `RaftConfig.applied` = the state machine's
  applied index (at least the storage snapshot's index), and restore the state machine from
  `storage.snapshot()` first; committed entries after it are handed out again.
- Between `ready()` and `advance()` the driver may keep stepping messages and ticking, but
  must not call `ready()` again. A leader may send the Ready's appends before its own save:
  it counts its own entries toward commit only at `advance()`.
- Snapshots are the driver's decision: after applying, call
  `storage.create_snapshot(applied, node.conf_state_at(applied), data)` and then
  `storage.compact(index)` (keep some entries for slow followers). A follower whose next
  entry was compacted gets `storage.snapshot()` in a SNAPSHOT message; the transport must
  call `report_snapshot(peer, ok)` once it has sent (or failed to send) it. A follower that
  receives one gets it in `Ready.snapshot`: persist it, restore the state machine from it.
- Proposals, appends and commit updates go out batched at the next `ready()`; call
  `propose()` many times between two Readies for throughput.
- `context = read_index()`: the answer is a `ReadState(index, context)` on the asking node;
  it is lost (never answered) if leadership changes meanwhile, so callers need a deadline.
  The core makes the context (a random nonce per RawNode and a counter): give every start of
  a node a differently seeded `random.Random`, or a restarted node could take an answer
  meant for its predecessor for its own.
- `report_peer_down(peer)`: the transport saw the connection to `peer` close.
- Membership (docs/architecture.md section 11): `propose_conf_change` adds a learner,
  promotes one or removes a member, one at a time; the configuration in force is
  `node.conf_state` (the last CONF_CHANGE entry in the log, committed or not). A node that
  joins an existing cluster starts with `RaftConfig.peers=()` and empty storage.
"""
