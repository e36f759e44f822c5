import CNBD
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// One libnbd connection to an NBD export: its size and block-size limits, the
/// meta contexts the server agreed to, block status of a context, and reads
/// that keep several requests in flight. The server is untrusted input: every
/// extent it reports is checked before it is used, and every wait has a timeout.
final class NBDConnection {
    /// One extent of a meta context: `flags` as the context defines them
    /// (base:allocation: bit 0 hole, bit 1 zero; qemu:dirty-bitmap: bit 0 dirty).
    struct Extent: Equatable {
        var start: UInt64
        var length: UInt64
        var flags: UInt32
        var end: UInt64 { start + length }
    }

    static let allocationContext = "base:allocation"
    static func dirtyBitmapContext(_ name: String) -> String { "qemu:dirty-bitmap:\(name)" }

    /// A block-status request carries a 32-bit length: ask for at most 2 GiB at a time.
    static let maxStatusRequest: UInt64 = 1 << 31
    /// Without a maximum from the server, the NBD spec's safe request size.
    static let defaultMaxBlock: UInt64 = 32 << 20
    /// Reads are split into requests of at most this size, all sent before waiting. Larger
    /// ones cost QEMU's NBD server freshly faulted pages for each request's bounce buffer:
    /// serving a 2 GiB backup, ~300,000 minor faults at 1 MiB, ~100,000 at 256 KiB, under
    /// 6,000 at 128 KiB (as for nbdcopy).
    static let readRequest: UInt64 = 128 << 10
    static let maxInFlight = 16

    let uri: String
    let size: UInt64
    /// Every request's offset and length are multiples of this.
    let minBlock: UInt64
    /// No request is longer than this.
    let maxBlock: UInt64
    /// The meta contexts the server agreed to (of those asked for).
    let contexts: Set<String>
    let version: String
    /// How long a wait may go without progress before it fails.
    let timeout: TimeInterval

    /// Whether the server allows several connections to this export (NBD_FLAG_CAN_MULTI_CONN).
    let canMultiConn: Bool
    /// How many connections read a plan ahead when the server allows several (nbdcopy's
    /// default): QEMU's NBD server works on at most 16 requests of a client at once.
    var readAheadConnections = 4
    /// How long an extra read-ahead connection may take to finish its handshake: a server at
    /// its client limit (qemu-nbd -e N) leaves it waiting, and the read-ahead then does without.
    static let extraHandshake: TimeInterval = 3
    /// Set when an extra connection failed (or the server kept it waiting): later plans try no more.
    private var extraRefused = false
    /// The most bytes the read-ahead buffers (sent or ready): a bound on its memory.
    var readAheadBytes: UInt64 = 16 << 20

    let lib: LibNBD
    private(set) var handle: LibNBD.Handle?

    /// The read-ahead of the plan announced by `willRead`, on this connection and `extraConnections`.
    private var readAhead: NBDReadAhead?
    /// Connections opened for the read-ahead (only when the server allows multi-conn), kept until `close`.
    private var extraConnections: [NBDConnection] = []

    /// Connects to `uri` (nbd://, nbds://, nbd+unix://… as libnbd parses them, query parameters
    /// such as tls-certificates=DIR included), asking for `contexts`.
    /// The handshake must end within `handshake` seconds (default: `timeout`).
    init(uri: String, contexts: [String], timeout: TimeInterval = 60, handshake: TimeInterval? = nil) throws {
        let lib = try LibNBD.shared()
        guard let handle = lib.create() else { throw LiveError(.io, "libnbd: \(lib.lastError())") }
        self.lib = lib
        self.handle = handle
        self.uri = uri
        self.timeout = timeout
        version = lib.getVersion(handle).map { String(cString: $0) } ?? "?"
        func fail(_ what: String) -> LiveError { LiveError(.io, "\(uri): \(what): \(lib.lastError())") }
        do {
            for context in contexts where lib.addMetaContext(handle, context) == -1 {
                throw fail("cannot ask for meta context \(context)")
            }
            // The URI is the user's own argument (as for nbdcopy and nbdinfo): it may name local
            // files, such as nbds://…?tls-certificates=DIR for a server with its own CA.
            // Every read either fills its whole buffer or fails (and a failed read's buffer is never
            // used), so libnbd need not zero each buffer before the server's reply overwrites it.
            guard lib.setPreadInitialize(handle, false) != -1 else { throw fail("cannot set up the connection") }
            guard lib.setURIAllowLocalFile(handle, true) != -1 else { throw fail("cannot set up the connection") }
            guard lib.aioConnectURI(handle, uri) != -1 else { throw fail("cannot connect") }
            let deadline = Date().addingTimeInterval(handshake ?? timeout)
            while lib.aioIsConnecting(handle) == 1 {
                guard Date() < deadline else {
                    throw LiveError(.io, "\(uri): the NBD server did not finish the handshake within \(Int(handshake ?? timeout)) s")
                }
                if lib.poll(handle, 1000) == -1 { throw fail("cannot connect") }
            }
            guard lib.aioIsReady(handle) == 1 else { throw fail("cannot connect") }
            let size = lib.getSize(handle)
            guard size >= 0 else { throw fail("no export size") }
            self.size = UInt64(size)
            let minimum = lib.getBlockSize(handle, LIBNBD_SIZE_MINIMUM)
            let maximum = lib.getBlockSize(handle, LIBNBD_SIZE_MAXIMUM)
            guard minimum >= 0, maximum >= 0 else { throw fail("no block size limits") }
            minBlock = max(UInt64(minimum), 1)
            maxBlock = maximum == 0 ? Self.defaultMaxBlock : UInt64(maximum)
            // NBD spec: the minimum is a power of two ≤ 64 KiB, the maximum a multiple of it.
            guard minBlock & (minBlock - 1) == 0, minBlock <= 65536, maxBlock >= minBlock, maxBlock % minBlock == 0,
                  self.size % minBlock == 0
            else {
                throw LiveError(.invalidFormat,
                                "\(uri): the server's block sizes (minimum \(minimum), maximum \(maximum)) or export size \(size) are not usable")
            }
            var agreed = Set<String>()
            for context in contexts {
                let can = lib.canMetaContext(handle, context)
                if can == -1 { throw fail("cannot query meta context \(context)") }
                if can == 1 { agreed.insert(context) }
            }
            self.contexts = agreed
            canMultiConn = lib.canMultiConn(handle) == 1
        } catch {
            lib.close(handle)
            self.handle = nil
            throw error
        }
    }

    deinit { close() }

    /// Disconnects politely (the server may be waiting for its clients to go), then frees the handle.
    func close() {
        if readAhead != nil {
            // Its workers stop at once; requests may be in flight, so the handles go before its buffers.
            abandon()
            return
        }
        for connection in extraConnections { connection.close() }
        extraConnections = []
        guard let handle else { return }
        _ = lib.shutdown(handle, 0)
        lib.close(handle)
        self.handle = nil
    }

    /// Drops the connection at once (after a failure, with requests possibly in flight:
    /// nothing may write into a caller's buffer after we return): the read-ahead's workers
    /// stop, every handle is closed, and only then are the read-ahead's buffers freed.
    private func abandon() {
        readAhead?.abandon()
        for connection in extraConnections { connection.abandon() }
        extraConnections = []
        if let handle { lib.close(handle) }
        handle = nil
        readAhead = nil
    }

    private func liveHandle() throws -> LibNBD.Handle {
        guard let handle else { throw LiveError(.io, "\(uri): the NBD connection was closed after an earlier error") }
        return handle
    }

    // MARK: - Waiting

    /// Polls until every cookie has completed; throws the first failure (after which the
    /// connection is abandoned) or when `timeout` passes without progress.
    private func wait(for cookies: inout [UInt64], what: String) throws {
        let handle = try liveHandle()
        var lastProgress = Date()
        while !cookies.isEmpty {
            var i = 0
            while i < cookies.count {
                switch lib.aioCommandCompleted(handle, cookies[i]) {
                case 0: i += 1
                case 1:
                    cookies.remove(at: i)
                    lastProgress = Date()
                default:
                    let message = lib.lastError()
                    abandon()
                    throw LiveError(.io, "\(uri): \(what) failed: \(message)")
                }
            }
            if cookies.isEmpty { break }
            let polled = lib.poll(handle, 1000)
            if polled == -1 {
                let message = lib.lastError()
                abandon()
                throw LiveError(.io, "\(uri): \(what) failed: \(message)")
            }
            if polled == 1 { lastProgress = Date() }
            if Date().timeIntervalSince(lastProgress) > timeout {
                abandon()
                throw LiveError(.io, "\(uri): the NBD server did not answer a \(what) within \(Int(timeout)) s")
            }
        }
    }

    // MARK: - Reads

    /// The size of one read request: `readRequest` within the block-size limits.
    private var requestSize: UInt64 { max(min(Self.readRequest, maxBlock) / minBlock * minBlock, minBlock) }

    /// Tells the connection which ranges the caller will read next, in this order (a backup's
    /// copy plan): they are read ahead on this connection and, when the server allows
    /// multi-conn, on `readAheadConnections - 1` more. Replaces an earlier announcement.
    /// A caller that reads the plan in pieces cut at multiples of `chunk` bytes, each into a
    /// buffer of `bufferSize` bytes (the copier), names them: the read-ahead then holds such
    /// pieces whole, to hand over with `read(exchanging:…)`.
    func willRead(_ ranges: [Range<UInt64>], chunk: Int? = nil, bufferSize: Int? = nil) throws {
        try endReadAhead()
        // Only whole ranges inside the export and on the minimum block size are read ahead;
        // anything else is read when asked for.
        let plan = ranges.filter {
            !$0.isEmpty && $0.upperBound <= size && $0.lowerBound % minBlock == 0 && $0.upperBound % minBlock == 0
        }
        guard !plan.isEmpty else { return }
        let handle = try liveHandle()
        if canMultiConn, !extraRefused, extraConnections.count + 1 < readAheadConnections {
            do {
                while extraConnections.count + 1 < readAheadConnections {
                    let extra = try NBDConnection(uri: uri, contexts: [], timeout: timeout,
                                                  handshake: min(timeout, Self.extraHandshake))
                    guard extra.size == size, extra.minBlock == minBlock else {
                        extra.close()
                        break
                    }
                    extraConnections.append(extra)
                }
            } catch {
                // The connections made so far read everything, and later plans ask no more: a
                // server at its client limit would keep each new one waiting again.
                extraRefused = true
            }
        }
        var readers = [NBDReadAhead.Reader(lib: lib, handle: handle, uri: uri)]
        for extra in extraConnections {
            if let handle = extra.handle { readers.append(NBDReadAhead.Reader(lib: extra.lib, handle: handle, uri: uri)) }
        }
        let step = requestSize
        // The copier's chunks when they fit the block-size limits, else one request per segment.
        var segment = step
        var buffer = Int(step)
        if let chunk, let bufferSize, chunk > 0, UInt64(chunk) % minBlock == 0, bufferSize >= chunk {
            segment = UInt64(chunk)
            buffer = bufferSize
        }
        readAhead = try NBDReadAhead(readers: readers, plan: plan, step: step, segment: segment, bufferSize: buffer,
                                     minBlock: minBlock, window: max(Int(readAheadBytes / segment), 2), timeout: timeout)
    }

    /// The read-ahead's counters (tests), nil when no plan is being read.
    var readAheadStats: NBDReadAhead.Stats? { readAhead?.stats }

    /// Ends the read-ahead once its requests are answered (so its buffers may go); after a
    /// failure, which leaves requests unanswered, the connection is dropped and the failure thrown.
    private func endReadAhead() throws {
        guard let readAhead else { return }
        readAhead.suspend()
        if let failure = readAhead.failed {
            abandon()
            throw failure
        }
        self.readAhead = nil
    }

    /// Runs `body` with this connection's handle to itself: the read-ahead's workers, one of
    /// which reads on it, are stopped meanwhile (their requests answered first).
    private func withOwnHandle<T>(_ body: () throws -> T) throws -> T {
        guard let readAhead else { return try body() }
        readAhead.suspend()
        if let failure = readAhead.failed {
            abandon()
            throw failure
        }
        defer { readAhead.resume() }
        return try body()
    }

    /// Reads `buffer.count` bytes at `offset` (within the export): from the read-ahead where it
    /// holds them, else as requests of at most `readRequest` bytes within the block-size limits,
    /// up to `maxInFlight` at once.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let count = UInt64(buffer.count)
        guard count > 0 else { return }
        guard offset <= size, count <= size - offset else {
            throw LiveError(.invalidArgument, "\(uri): read of \(count) bytes at \(offset) is past the export's end (\(size))")
        }
        let end = offset + count
        var position = offset
        while position < end {
            let into = Int(position - offset)
            let rest = UnsafeMutableRawBufferPointer(rebasing: buffer[into...])
            guard let readAhead else {
                try readDirect(into: rest, at: position)
                return
            }
            let taken: NBDReadAhead.Taken
            do {
                taken = try readAhead.take(at: position, upTo: end, into: rest)
            } catch {
                abandon()
                throw error
            }
            switch taken {
            case .copied(let n):
                position += n
            case .notAhead(let stop):
                if readAhead.isFinished {
                    // The plan is read: the read-ahead (its buffers) can go.
                    try endReadAhead()
                    continue
                }
                try withOwnHandle {
                    try readDirect(into: UnsafeMutableRawBufferPointer(rebasing: buffer[into..<Int(stop - offset)]), at: position)
                }
                position = stop
            }
        }
    }

    /// Reads `count` bytes at `offset` for a caller that announced its chunks to `willRead`:
    /// when the read-ahead holds exactly those bytes as one piece, hands over its buffer (the
    /// caller owns and frees it) and keeps `buffer` (the announced size, page aligned,
    /// from `UnsafeMutableRawBufferPointer.allocate`); else reads into `buffer` and returns nil.
    func read(exchanging buffer: UnsafeMutableRawBufferPointer, count: Int, at offset: UInt64) throws
        -> UnsafeMutableRawBufferPointer? {
        if let readAhead {
            do {
                if let theirs = try readAhead.exchange(at: offset, count: count, buffer: buffer) { return theirs }
            } catch {
                abandon()
                throw error
            }
        }
        try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
        return nil
    }

    /// A read straight from the server (not from the read-ahead).
    private func readDirect(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let count = UInt64(buffer.count)
        guard offset % minBlock == 0, count % minBlock == 0 else {
            try readUnaligned(into: buffer, at: offset)
            return
        }
        let handle = try liveHandle()
        let step = requestSize
        var cookies: [UInt64] = []
        var done: UInt64 = 0
        while done < count {
            if cookies.count >= Self.maxInFlight {
                // Wait for the oldest before sending more.
                var oldest = [cookies.removeFirst()]
                try wait(for: &oldest, what: "read")
            }
            let n = min(step, count - done)
            let cookie = lib.aioPread(handle, buffer.baseAddress! + Int(done), Int(n), offset + done,
                                      nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)
            if cookie == -1 {
                let message = lib.lastError()
                abandon()
                throw LiveError(.io, "\(uri): read of \(n) bytes at \(offset + done) failed: \(message)")
            }
            cookies.append(UInt64(cookie))
            done += n
        }
        try wait(for: &cookies, what: "read")
    }

    /// A read whose ends are not on the server's minimum block size: the covering aligned range through a bounce buffer.
    private func readUnaligned(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let lo = offset / minBlock * minBlock
        let hi = min(size, (offset + UInt64(buffer.count) + minBlock - 1) / minBlock * minBlock)
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(hi - lo), alignment: 4096)
        defer { bounce.deallocate() }
        try readDirect(into: bounce, at: lo)
        let skip = Int(offset - lo)
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[skip..<(skip + buffer.count)]))
    }

    // MARK: - Block status

    /// The extents of `context` from `offset`, covering at least one byte and at most
    /// `count` bytes (clipped to 2 GiB per request and to the export); validated: they
    /// start at `offset`, are contiguous and non-empty.
    func blockStatus(_ context: String, at offset: UInt64, count: UInt64) throws -> [Extent] {
        try withOwnHandle { try ownBlockStatus(context, at: offset, count: count) }
    }

    private func ownBlockStatus(_ context: String, at offset: UInt64, count: UInt64) throws -> [Extent] {
        guard contexts.contains(context) else {
            throw LiveError(.refused, "\(uri): the export does not offer meta context \(context)")
        }
        guard offset < size else { return [] }
        let handle = try liveHandle()
        var length = min(count, size - offset, Self.maxStatusRequest)
        length = max(length / minBlock * minBlock, min(minBlock, size - offset))
        let sink = ExtentSink(context: context)
        let callback = nbd_extent_callback(
            callback: { userData, metacontext, start, entries, count, _ in
                guard let userData, let metacontext else { return 0 }
                let sink = Unmanaged<ExtentSink>.fromOpaque(userData).takeUnretainedValue()
                guard String(cString: metacontext) == sink.context else { return 0 }
                guard let entries, count % 2 == 0 else {
                    sink.malformed = true
                    return 0
                }
                sink.replies += 1
                var at = start
                for i in stride(from: 0, to: count, by: 2) {
                    sink.extents.append(Extent(start: at, length: UInt64(entries[i]), flags: entries[i + 1]))
                    let (next, overflow) = at.addingReportingOverflow(UInt64(entries[i]))
                    if overflow { sink.malformed = true; return 0 }
                    at = next
                }
                return 0
            },
            user_data: Unmanaged.passRetained(sink).toOpaque(),
            free: { userData in
                if let userData { Unmanaged<ExtentSink>.fromOpaque(userData).release() }
            })
        let cookie = lib.aioBlockStatus(handle, length, offset, callback,
                                        nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)
        guard cookie != -1 else {
            throw LiveError(.io, "\(uri): block status of \(context) at \(offset) failed: \(lib.lastError())")
        }
        var cookies = [UInt64(cookie)]
        try wait(for: &cookies, what: "block status")
        return try validate(sink, offset: offset, length: length)
    }

    /// Checks what the server said: one reply for the context, extents from `offset` on,
    /// each at least one byte; the last one is clipped to the request.
    private func validate(_ sink: ExtentSink, offset: UInt64, length: UInt64) throws -> [Extent] {
        func bad(_ what: String) -> LiveError {
            LiveError(.invalidFormat, "\(uri): the server's block status for \(sink.context) at \(offset) \(what)")
        }
        guard !sink.malformed, sink.replies == 1 else { throw bad("came in \(sink.replies) replies or malformed") }
        guard let first = sink.extents.first, first.start == offset else { throw bad("does not start at \(offset)") }
        let end = offset + length
        var out: [Extent] = []
        for var extent in sink.extents {
            guard extent.length > 0 else { throw bad("has an empty extent at \(extent.start)") }
            guard extent.start < end else { break }
            extent.length = min(extent.length, end - extent.start)
            out.append(extent)
        }
        return out
    }
}

/// Collects the extents of one meta context from libnbd's callback (which runs
/// once per negotiated context, on the polling thread).
private final class ExtentSink {
    let context: String
    var extents: [NBDConnection.Extent] = []
    var replies = 0
    var malformed = false
    init(context: String) { self.context = context }
}
