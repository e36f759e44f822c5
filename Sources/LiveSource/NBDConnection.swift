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
    /// Reads are split into requests of at most this size, all sent before waiting.
    static let readRequest: UInt64 = 1 << 20
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

    private let lib: LibNBD
    private var handle: LibNBD.Handle?

    /// Read-ahead along the ranges the caller said it will read, in order (`willRead`):
    /// up to `maxInFlight` requests of `readRequest` bytes are kept in flight across the
    /// caller's reads, so the server never waits for the caller between two of them.
    private struct Segment {
        var range: Range<UInt64>
        var buffer: UnsafeMutableRawBufferPointer
        var cookie: UInt64?
    }
    private var ahead: [Range<UInt64>] = []
    private var aheadIndex = 0
    private var aheadOffset: UInt64 = 0
    private var segments: [Segment] = []
    private var spareBuffers: [UnsafeMutableRawBufferPointer] = []

    /// Connects to `uri` (nbd://, nbds://, nbd+unix://… as libnbd parses them), asking for `contexts`.
    init(uri: String, contexts: [String], timeout: TimeInterval = 60) throws {
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
            guard lib.aioConnectURI(handle, uri) != -1 else { throw fail("cannot connect") }
            let deadline = Date().addingTimeInterval(timeout)
            while lib.aioIsConnecting(handle) == 1 {
                guard Date() < deadline else {
                    throw LiveError(.io, "\(uri): the NBD server did not finish the handshake within \(Int(timeout)) s")
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
        } catch {
            lib.close(handle)
            self.handle = nil
            throw error
        }
    }

    deinit { close() }

    /// Disconnects politely (the server may be waiting for its clients to go), then frees the handle.
    func close() {
        guard let handle else { return }
        _ = lib.shutdown(handle, 0)
        lib.close(handle)
        self.handle = nil
        freeReadAhead()
    }

    /// Drops the connection at once (after a failure, with requests possibly in flight:
    /// nothing may write into a caller's buffer after we return).
    private func abandon() {
        guard let handle else { return }
        lib.close(handle)
        self.handle = nil
        freeReadAhead()
    }

    /// Once the handle is closed no request can complete into a read-ahead buffer any more.
    private func freeReadAhead() {
        for segment in segments { segment.buffer.deallocate() }
        for buffer in spareBuffers { buffer.deallocate() }
        segments = []
        spareBuffers = []
        ahead = []
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
    /// copy plan): it starts reading them ahead. Replaces an earlier announcement.
    func willRead(_ ranges: [Range<UInt64>]) throws {
        try dropReadAhead(before: .max)
        // Only whole ranges inside the export and on the minimum block size are read ahead;
        // anything else is read when asked for.
        ahead = ranges.filter {
            !$0.isEmpty && $0.upperBound <= size && $0.lowerBound % minBlock == 0 && $0.upperBound % minBlock == 0
        }
        aheadIndex = 0
        aheadOffset = ahead.first?.lowerBound ?? 0
        try refillReadAhead()
    }

    /// Sends read-ahead requests until `maxInFlight` segments are pending or the ranges end.
    private func refillReadAhead() throws {
        let handle = try liveHandle()
        let step = requestSize
        while segments.count < Self.maxInFlight, aheadIndex < ahead.count {
            let range = ahead[aheadIndex]
            let n = min(step, range.upperBound - aheadOffset)
            let buffer = spareBuffers.popLast()
                ?? UnsafeMutableRawBufferPointer.allocate(byteCount: Int(step), alignment: 4096)
            let cookie = lib.aioPread(handle, buffer.baseAddress, Int(n), aheadOffset,
                                      nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)
            if cookie == -1 {
                let message = lib.lastError()
                buffer.deallocate()
                abandon()
                throw LiveError(.io, "\(uri): read of \(n) bytes at \(aheadOffset) failed: \(message)")
            }
            segments.append(Segment(range: aheadOffset..<(aheadOffset + n), buffer: buffer, cookie: UInt64(cookie)))
            aheadOffset += n
            if aheadOffset == range.upperBound {
                aheadIndex += 1
                if aheadIndex < ahead.count { aheadOffset = ahead[aheadIndex].lowerBound }
            }
        }
    }

    /// Waits for the first segment's request (its buffer then holds the data).
    private func completeFirstSegment() throws {
        guard var cookies = segments.first?.cookie.map({ [$0] }) else { return }
        try wait(for: &cookies, what: "read")
        segments[0].cookie = nil
    }

    /// Drops read-ahead segments that end at or before `offset` (the caller skipped them).
    private func dropReadAhead(before offset: UInt64) throws {
        while let first = segments.first, first.range.upperBound <= offset {
            try completeFirstSegment()  // the server may still write into the buffer until then
            spareBuffers.append(segments.removeFirst().buffer)
        }
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
        guard !segments.isEmpty else {
            try readDirect(into: buffer, at: offset)
            return
        }
        let end = offset + count
        var position = offset
        while position < end {
            try dropReadAhead(before: position + 1)
            let into = Int(position - offset)
            guard let first = segments.first, first.range.lowerBound <= position else {
                // Not read ahead: straight from the server, up to the next segment.
                let stop = min(end, segments.first?.range.lowerBound ?? end)
                try readDirect(into: UnsafeMutableRawBufferPointer(rebasing: buffer[into..<Int(stop - offset)]), at: position)
                position = stop
                continue
            }
            try completeFirstSegment()
            let n = min(end, first.range.upperBound) - position
            let from = Int(position - first.range.lowerBound)
            UnsafeMutableRawBufferPointer(rebasing: buffer[into..<(into + Int(n))])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: first.buffer[from..<(from + Int(n))]))
            position += n
            if position == first.range.upperBound { spareBuffers.append(segments.removeFirst().buffer) }
            try refillReadAhead()
        }
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
