import CNBD
import Dispatch
import FoundationEssentials
import QCowImage
#if canImport(Glibc)
import Glibc
#endif

/// Reads a copy plan ahead on one or more NBD connections, each driven by its own
/// thread that sends requests and polls for replies all the time, so the server's
/// replies never wait while the caller detects zeros or hands buffers on. The plan is
/// cut into segments where a multiple of `segment` bytes falls (as the copier cuts its
/// chunks), each read by requests of at most `step` bytes on one connection and handed
/// out in order to whichever connection has room; at most `window` segments are buffered
/// (sent or ready), which bounds memory. The caller consumes them in plan order: `take`
/// copies bytes out, `exchange` hands over a whole segment's buffer for one of the
/// caller's (the copy a backup would otherwise make of every byte).
///
/// Threads: the caller's thread calls every method; each connection's handle is used
/// only by its worker while workers run (`suspend` stops them, after which the caller
/// may use the first connection, its own, again). A failed request, a dead connection
/// or a server silent for `timeout` fails the read-ahead: the caller's next `take`
/// throws, and `abandon` then closes every handle before any buffer is freed.
final class NBDReadAhead: @unchecked Sendable {
    /// What `take` did: copied bytes from the read-ahead, or found that the range from the
    /// position up to `until` is not read ahead (the caller reads it directly).
    enum Taken: Equatable {
        case copied(UInt64)
        case notAhead(until: UInt64)
    }

    /// Counters for tests: how many connections read, the most requests in flight at once,
    /// how many segments hold data nobody has taken yet, and how many were handed over whole.
    struct Stats: Equatable {
        var connections: Int
        var peakInFlight: Int
        var ready: Int
        var exchanged: Int
    }

    /// One connection a worker reads on (its handle is the worker's while workers run).
    struct Reader: @unchecked Sendable {
        let lib: LibNBD
        let handle: LibNBD.Handle
        let uri: String
    }

    private struct Segment {
        var range: Range<UInt64>
        /// Requests sent for it whose replies are not in yet.
        var pending: Int
        /// Every reply is in: its bytes may be taken.
        var ready: Bool { pending == 0 }
    }

    let readers: [Reader]
    let step: UInt64
    let segment: UInt64
    /// The size of every segment buffer (at least `segment`): what `exchange` swaps.
    let bufferSize: Int
    let minBlock: UInt64
    let window: Int
    let timeout: TimeInterval

    // Everything below is guarded by `mutex`.
    private var plan: [Range<UInt64>]
    private var planIndex = 0
    private var planOffset: UInt64
    private var segments: [Segment?]
    private var buffers: [UnsafeMutableRawBufferPointer?]
    /// Segments `head..<tail` (by sequence number; slot `seq % window`) are sent or ready.
    private var head = 0
    private var tail = 0
    private var failure: LiveError?
    private var stopping = false
    private var abandoning = false
    private var inFlight = 0
    private var peakInFlight = 0
    private var exchanged = 0

    private let mutex = ConditionLock()
    /// One non-blocking pipe per worker, polled with its socket: written when the caller
    /// frees a segment or the read-ahead stops.
    private let wakers: [(read: Int32, write: Int32)]
    private let queues: [DispatchQueue]
    private let workers = DispatchGroup()
    private var running = false

    /// Starts reading `plan` (ranges inside the export, on `minBlock`) on `readers`, in
    /// segments cut at multiples of `segment` bytes, `step` bytes per request (both multiples
    /// of `minBlock`), into buffers of `bufferSize` bytes (page aligned).
    init(readers: [Reader], plan: [Range<UInt64>], step: UInt64, segment: UInt64, bufferSize: Int, minBlock: UInt64,
         window: Int, timeout: TimeInterval) throws {
        precondition(!readers.isEmpty && step > 0 && segment > 0 && bufferSize >= segment && window > 0)
        self.readers = readers
        self.step = step
        self.segment = segment
        self.bufferSize = bufferSize
        self.minBlock = minBlock
        self.window = window
        self.timeout = timeout
        self.plan = plan
        planOffset = plan.first?.lowerBound ?? 0
        segments = Array(repeating: nil, count: window)
        buffers = Array(repeating: nil, count: window)
        var wakers: [(read: Int32, write: Int32)] = []
        for _ in readers {
            var fds: [Int32] = [-1, -1]
            let made = pipe(&fds) == 0
            if made {
                for fd in fds {
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                }
            }
            guard made else {
                let why = String(cString: strerror(errno))
                for pipe in wakers { Glibc.close(pipe.read); Glibc.close(pipe.write) }
                throw LiveError(.io, "cannot create a pipe for the NBD read-ahead: \(why)")
            }
            wakers.append((fds[0], fds[1]))
        }
        self.wakers = wakers
        queues = readers.indices.map { DispatchQueue(label: "qbackup.nbd-read-ahead.\($0)") }
        resume()
    }

    deinit {
        precondition(!running, "NBDReadAhead freed while its workers run")
        for buffer in buffers { buffer?.deallocate() }
        for pipe in wakers { Glibc.close(pipe.read); Glibc.close(pipe.write) }
    }

    private func locked<T>(_ body: () throws -> T) rethrows -> T { try mutex.locked(body) }

    private func wakeWorkers() {
        var one: UInt8 = 1
        for pipe in wakers { _ = write(pipe.write, &one, 1) }  // a full pipe wakes its worker as well
    }

    var stats: Stats {
        locked {
            Stats(connections: readers.count, peakInFlight: peakInFlight,
                  ready: (head..<tail).filter { segments[$0 % window]?.ready == true }.count, exchanged: exchanged)
        }
    }

    /// The read-ahead's failure, if it failed.
    var failed: LiveError? { locked { failure } }

    /// Whether nothing is left to read ahead or to take.
    var isFinished: Bool { locked { planIndex == plan.count && head == tail } }

    // MARK: - The caller's side

    /// Copies bytes at `position` (up to `end`) into `buffer` from the read-ahead, waiting for
    /// them if they are on their way; segments before `position` are dropped (the caller
    /// skipped them). Throws the read-ahead's failure.
    func take(at position: UInt64, upTo end: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Taken {
        mutex.lock()
        defer { mutex.unlock() }
        let range: Range<UInt64>
        switch try awaitSegment(at: position, upTo: end) {
        case .notAhead(let until): return .notAhead(until: until)
        case .ready(let ready): range = ready
        }
        let n = min(end, range.upperBound) - position
        let from = Int(position - range.lowerBound)
        guard let source = buffers[head % window] else { preconditionFailure("a ready segment without a buffer") }
        // The segment stays ours while we copy: only this thread frees segments.
        mutex.unlock()
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[from..<(from + Int(n))]))
        mutex.lock()
        if position + n == range.upperBound { freeHead() }
        return .copied(n)
    }

    /// When the read-ahead holds exactly the `count` bytes at `position` as one segment, waits
    /// for them and hands over that segment's buffer (`bufferSize` bytes, the data at its
    /// start), keeping `buffer` (as large, page aligned, allocated by
    /// `UnsafeMutableRawBufferPointer.allocate`) to read later segments into: the caller owns
    /// the returned buffer and frees it. Nil when the bytes are not one segment here (the
    /// caller then `take`s or reads them). Throws the read-ahead's failure.
    func exchange(at position: UInt64, count: Int, buffer: UnsafeMutableRawBufferPointer) throws
        -> UnsafeMutableRawBufferPointer? {
        guard buffer.count == bufferSize, count > 0 else { return nil }
        mutex.lock()
        defer { mutex.unlock() }
        guard case .ready(let range) = try awaitSegment(at: position, upTo: position + UInt64(count)),
              range == position..<(position + UInt64(count)),
              let theirs = buffers[head % window]
        else { return nil }
        buffers[head % window] = buffer
        exchanged += 1
        freeHead()
        return theirs
    }

    private enum Head {
        /// The first segment holds the position and its replies are in.
        case ready(Range<UInt64>)
        case notAhead(until: UInt64)
    }

    /// With `mutex` held: drops the segments before `position` and waits until the one holding
    /// it (the first) is ready, or finds the bytes from `position` up to `until` not read ahead.
    /// Throws the read-ahead's failure when it would have to wait.
    private func awaitSegment(at position: UInt64, upTo end: UInt64) throws -> Head {
        // Segments that are ready are served even after a failure (their data was read);
        // the failure is thrown when the caller would have to wait.
        func wait() throws {
            if let failure { throw failure }
            mutex.wait()
        }
        while true {
            // Skipped segments go only once their replies are in: the server writes into the buffer until then.
            if head < tail, let first = segments[head % window], first.range.upperBound <= position {
                if !first.ready {
                    try wait()
                    continue
                }
                freeHead()
                continue
            }
            if head < tail, let first = segments[head % window] {
                if first.range.lowerBound > position { return .notAhead(until: min(end, first.range.lowerBound)) }
                if !first.ready {
                    try wait()
                    continue
                }
                return .ready(first.range)
            }
            // Nothing sent: skip the plan's ranges that end before the position.
            while planIndex < plan.count, plan[planIndex].upperBound <= position {
                planIndex += 1
                if planIndex < plan.count { planOffset = plan[planIndex].lowerBound }
            }
            if let failure { throw failure }
            guard planIndex < plan.count else { return .notAhead(until: end) }
            if planOffset > position { return .notAhead(until: min(end, planOffset)) }
            // The position is in the plan but not yet sent: from there on, and wait for a worker.
            guard running else { return .notAhead(until: min(end, plan[planIndex].upperBound)) }
            planOffset = max(planOffset, position / minBlock * minBlock)
            wakeWorkers()
            try wait()
        }
    }

    /// With `mutex` held: the first segment is taken or skipped; its slot is free again.
    private func freeHead() {
        segments[head % window] = nil
        head += 1
        wakeWorkers()
    }

    /// Stops the workers after their requests in flight are answered (ready segments stay);
    /// the caller may then use its connection. `resume` starts them again.
    func suspend() {
        guard running else { return }
        locked { stopping = true }
        wakeWorkers()
        workers.wait()
        locked { stopping = false }
        running = false
    }

    /// Starts the workers (after `init` or `suspend`); they end when the plan is read.
    func resume() {
        guard !running, locked({ failure == nil && !abandoning }) else { return }
        running = true
        for (index, reader) in readers.enumerated() {
            queues[index].async(group: workers) { self.work(index, reader) }
        }
    }

    /// Stops the workers without waiting for their requests: the caller must close every
    /// connection before the read-ahead (and its buffers) goes.
    func abandon() {
        locked {
            abandoning = true
            mutex.broadcast()
        }
        wakeWorkers()
        workers.wait()
        running = false
    }

    // MARK: - A worker

    /// With `mutex` held: the next segment of the plan, up to the next multiple of `segment`
    /// or the range's end, or nil at the plan's end.
    private func nextPiece() -> Range<UInt64>? {
        guard planIndex < plan.count else { return nil }
        let range = plan[planIndex]
        let boundary = (planOffset / segment + 1) * segment
        let piece = planOffset..<min(range.upperBound, boundary)
        planOffset = piece.upperBound
        if planOffset == range.upperBound {
            planIndex += 1
            if planIndex < plan.count { planOffset = plan[planIndex].lowerBound }
        }
        return piece
    }

    /// With `mutex` held: records the first failure and wakes everyone.
    private func fail(_ message: String) {
        if failure == nil { failure = LiveError(.io, message) }
        mutex.broadcast()
    }

    /// One connection's loop: keep requests in flight while the window has room, poll the
    /// socket (and the waker) and mark segments ready as their replies come in.
    private func work(_ index: Int, _ reader: Reader) {
        let lib = reader.lib
        let handle = reader.handle
        let uri = reader.uri
        var sent: [(cookie: UInt64, seq: Int)] = []
        var lastProgress = Date()
        while true {
            mutex.lock()
            // Stop at once on a failure or `abandon`; on `suspend` or at the plan's end, once answered.
            if failure != nil || abandoning {
                mutex.unlock()
                return
            }
            while !stopping, tail - head < window, let piece = nextPiece() {
                let seq = tail
                tail += 1
                let slot = seq % window
                // Its requests: all on this connection; it is ready when the last reply is in.
                let length = piece.upperBound - piece.lowerBound
                let requests = Int((length + step - 1) / step)
                segments[slot] = Segment(range: piece, pending: requests)
                let buffer = buffers[slot] ?? UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096)
                buffers[slot] = buffer
                inFlight += requests
                peakInFlight = max(peakInFlight, inFlight)
                mutex.broadcast()
                mutex.unlock()
                if sent.isEmpty { lastProgress = Date() }
                for request in 0..<requests {
                    let at = UInt64(request) * step
                    let n = min(step, length - at)
                    let cookie = lib.aioPread(handle, buffer.baseAddress! + Int(at), Int(n), piece.lowerBound + at,
                                              nbd_completion_callback(callback: nil, user_data: nil, free: nil), 0)
                    guard cookie != -1 else {
                        let message = lib.lastError()
                        mutex.lock()
                        fail("\(uri): read of \(n) bytes at \(piece.lowerBound + at) failed: \(message)")
                        mutex.unlock()
                        wakeWorkers()
                        return
                    }
                    sent.append((UInt64(cookie), seq))
                }
                mutex.lock()
            }
            let done = sent.isEmpty && (stopping || planIndex == plan.count)
            mutex.unlock()
            if done { return }

            // Wait for the server (or a wake-up), up to a second at a time.
            let direction = lib.aioGetDirection(handle)
            var fds = [
                pollfd(fd: lib.aioGetFd(handle),
                       events: Int16((direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 ? POLLIN : 0)
                                     | (direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 ? POLLOUT : 0)),
                       revents: 0),
                pollfd(fd: wakers[index].read, events: Int16(POLLIN), revents: 0),
            ]
            let polled = poll(&fds, 2, 1000)
            var problem: String?
            if polled < 0 && errno != EINTR {
                problem = "poll failed: \(String(cString: strerror(errno)))"
            } else if polled > 0 {
                let events = Int32(fds[0].revents)
                if events & (POLLIN | POLLHUP | POLLERR) != 0, lib.aioNotifyRead(handle) == -1 {
                    problem = lib.lastError()
                }
                if problem == nil, events & POLLOUT != 0, lib.aioNotifyWrite(handle) == -1 {
                    problem = lib.lastError()
                }
                if fds[1].revents != 0 {
                    var drain = [UInt8](repeating: 0, count: 256)
                    _ = read(wakers[index].read, &drain, drain.count)
                }
            }
            // Retire what completed.
            var completed: [Int] = []
            var i = 0
            while problem == nil, i < sent.count {
                switch lib.aioCommandCompleted(handle, sent[i].cookie) {
                case 0: i += 1
                case 1: completed.append(sent.remove(at: i).seq)
                default: problem = "read failed: \(lib.lastError())"
                }
            }
            if !completed.isEmpty { lastProgress = Date() }
            if problem == nil, !sent.isEmpty, Date().timeIntervalSince(lastProgress) > timeout {
                problem = "the NBD server did not answer a read within \(Int(timeout)) s"
            }
            mutex.lock()
            for seq in completed { segments[seq % window]?.pending -= 1 }
            inFlight -= completed.count
            if let problem { fail("\(uri): \(problem)") }
            if !completed.isEmpty || problem != nil { mutex.broadcast() }
            mutex.unlock()
            if problem != nil {
                wakeWorkers()
                return
            }
        }
    }
}
