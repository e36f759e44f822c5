import Dispatch
import QCowImage
#if canImport(Glibc)
import Glibc
#endif

/// A bounded ring of bytes between a stream's caller and one thread of its own, so the caller
/// compresses, checks and writes while the thread waits on the pipe or socket (ssh, the other
/// side's qbackup): a sender that writes a 4 MiB record, then reads and compresses the next, and
/// a receiver that reads one, then decodes and writes it, would each leave the other (and ssh)
/// idle half the time. The caller's thread calls every method but the worker's loop.
///
/// The ring's free part belongs to whoever fills it and its used part to whoever drains it, so
/// bytes are copied in and out without the lock; the lock guards only the counters.
private final class ByteRing: @unchecked Sendable {
    let capacity: Int
    let storage: UnsafeMutableRawBufferPointer
    /// Everything below is guarded by `mutex`.
    var start = 0
    var count = 0
    var failure: Error?
    /// The filling side is done: no more bytes come (the stream ended, or the writer closes).
    var ended = false
    /// The draining side stopped: the worker returns as soon as it can.
    var stopping = false

    private let mutex = ConditionLock()

    init(capacity: Int) {
        self.capacity = capacity
        storage = .allocate(byteCount: capacity, alignment: 4096)
    }

    deinit { storage.deallocate() }

    /// Runs `body` with the lock held; it may `wait()`. Everyone waiting is woken after it.
    func locked<T>(_ body: () throws -> T) rethrows -> T {
        try mutex.locked {
            defer { mutex.broadcast() }
            return try body()
        }
    }

    /// With the lock held: waits for a change.
    func wait() { mutex.wait() }

    /// With the lock held: the free part after the used one, up to the ring's end (empty when full).
    var freeRegion: UnsafeMutableRawBufferPointer {
        let tail = (start + count) % capacity
        return UnsafeMutableRawBufferPointer(rebasing: storage[tail..<(tail + min(capacity - count, capacity - tail))])
    }

    /// With the lock held: the used part from its start, up to the ring's end.
    var usedRegion: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: storage[start..<(start + min(count, capacity - start))])
    }

    /// With the lock held: `n` bytes of the used part's start are drained.
    func drained(_ n: Int) {
        start = (start + n) % capacity
        count -= n
    }
}

/// Reads a stream descriptor ahead on a thread of its own into `capacity` bytes, which the caller
/// then takes. At the stream's end, or after a failed read (thrown once the bytes before it are
/// taken), the thread ends; `stop` ends it at once, and must be called before the descriptor is
/// closed. Bytes read ahead and not taken are lost at `stop`.
final class ReadAheadStream: StreamInput, @unchecked Sendable {
    private let source: DescriptorStream
    private let ring: ByteRing
    private let waker: (read: Int32, write: Int32)
    private let queue = DispatchQueue(label: "qbackup.stream-read-ahead")
    private let worker = DispatchGroup()
    private var running = false

    init(_ source: DescriptorStream, capacity: Int = 8 << 20) throws {
        self.source = source
        ring = ByteRing(capacity: capacity)
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else {
            throw ChainError(.io, "cannot create a pipe to read \(source.name) ahead: \(String(cString: strerror(errno)))")
        }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        waker = (fds[0], fds[1])
        running = true
        queue.async(group: worker) { self.work() }
    }

    deinit {
        stop()
        close(waker.read)
        close(waker.write)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let used: UnsafeRawBufferPointer? = try ring.locked {
            while ring.count == 0 && !ring.ended { ring.wait() }
            if ring.count == 0 {
                if let failure = ring.failure { throw failure }
                return nil
            }
            return ring.usedRegion
        }
        guard let used else { return 0 }
        let n = min(used.count, buffer.count)
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: used[0..<n]))
        ring.locked { ring.drained(n) }
        return n
    }

    /// Ends the thread (waiting for it): nothing more is read from the descriptor.
    func stop() {
        guard running else { return }
        ring.locked { ring.stopping = true }
        var one: UInt8 = 1
        _ = write(waker.write, &one, 1)
        worker.wait()
        running = false
    }

    private func work() {
        while true {
            let room: UnsafeMutableRawBufferPointer? = ring.locked {
                while ring.count == ring.capacity && !ring.stopping { ring.wait() }
                return ring.stopping ? nil : ring.freeRegion
            }
            guard let room else { return }
            // Wait for bytes or for `stop`, so the thread never sits in a read nobody wants.
            var fds = [pollfd(fd: source.fd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: waker.read, events: Int16(POLLIN), revents: 0)]
            let polled = poll(&fds, 2, -1)
            if polled < 0 && errno == EINTR { continue }
            if fds[1].revents != 0 { return }
            let outcome = Result { try source.read(into: room) }
            let more = ring.locked { () -> Bool in
                switch outcome {
                case .success(let n) where n > 0:
                    ring.count += n
                    return true
                case .success:
                    ring.ended = true
                case .failure(let error):
                    ring.failure = error
                    ring.ended = true
                }
                return false
            }
            if !more { return }
        }
    }
}

/// Writes to a stream on a thread of its own from `capacity` bytes the caller fills: `write`
/// returns once its bytes are in the ring. The first failed write is thrown by the next `write`
/// or by `finish`, which waits until every byte is written.
final class WriteBehindStream: StreamOutput, @unchecked Sendable {
    private let output: StreamOutput
    private let ring: ByteRing
    private let queue = DispatchQueue(label: "qbackup.stream-write-behind")
    private let worker = DispatchGroup()
    private var running = true
    /// The most bytes one write to `output` carries, so the ring frees as the reader takes them.
    private static let piece = 1 << 20

    init(_ output: StreamOutput, capacity: Int = 8 << 20) {
        self.output = output
        ring = ByteRing(capacity: capacity)
        queue.async(group: worker) { self.work() }
    }

    deinit { try? finish() }

    func write(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            let room = try ring.locked { () -> UnsafeMutableRawBufferPointer in
                while ring.count == ring.capacity && ring.failure == nil { ring.wait() }
                if let failure = ring.failure { throw failure }
                return ring.freeRegion
            }
            let n = min(room.count, bytes.count - done)
            room.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[done..<(done + n)]))
            ring.locked { ring.count += n }
            done += n
        }
    }

    /// Waits until every byte is written (or a write failed, which it throws); the thread ends.
    func finish() throws {
        if running {
            ring.locked { ring.ended = true }
            worker.wait()
            running = false
        }
        if let failure = ring.locked({ ring.failure }) { throw failure }
    }

    private func work() {
        while true {
            let used: UnsafeRawBufferPointer? = ring.locked {
                while ring.count == 0 && !ring.ended { ring.wait() }
                return ring.count == 0 ? nil : ring.usedRegion
            }
            guard let used else { return }
            let n = min(used.count, Self.piece)
            do {
                try output.write(UnsafeRawBufferPointer(rebasing: used[0..<n]))
            } catch {
                ring.locked { ring.failure = error }
                return
            }
            ring.locked { ring.drained(n) }
        }
    }
}
