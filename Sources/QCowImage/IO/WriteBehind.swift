import Dispatch

/// Overlaps reading and writing on two cores: the caller's thread fills buffers
/// and queues writes; one writer thread runs them in the order they were queued.
/// A copy loop that reads a chunk, then writes it, leaves one core idle and the
/// disk waiting half the time; with a few buffers in flight, the next read runs
/// while the last write does.
///
/// Everything the queued work touches (an output `QCowFile`, say) must be used only
/// by queued work until `finish()` returns. The first error a write throws is thrown
/// by the next `submit` or by `finish`; later work is skipped.
public final class WriteBehind: @unchecked Sendable {
    public let bufferSize: Int
    /// Each slot's buffer (only the caller's thread touches the array; a fill may swap one).
    private var buffers: [UnsafeMutableRawBufferPointer]
    private var free: [Int]
    private let freeCount: DispatchSemaphore
    private let lock = DispatchSemaphore(value: 1)
    private let writer = DispatchQueue(label: "qbackup.write-behind")
    /// The middle stage (compression), between the caller's fill and the writer.
    private let processor = DispatchQueue(label: "qbackup.write-behind.process")
    private var failure: Error?

    /// `buffers` buffers of `bufferSize` bytes each (page aligned).
    public init(buffers count: Int = 3, bufferSize: Int) {
        precondition(count >= 1 && bufferSize > 0)
        self.bufferSize = bufferSize
        buffers = (0..<count).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: bufferSize, alignment: 4096) }
        free = Array(0..<count)
        freeCount = DispatchSemaphore(value: count)
    }

    deinit {
        processor.sync {}
        writer.sync {}
        for buffer in buffers { buffer.deallocate() }
    }

    private struct Unchecked<T>: @unchecked Sendable { let value: T }

    private func firstFailure() -> Error? {
        lock.wait()
        defer { lock.signal() }
        return failure
    }

    /// Waits for a free buffer, lets `fill` put `n` bytes in it (on this thread), then
    /// queues `write` of those bytes. `fill` returning 0 queues nothing.
    public func submit(fill: (UnsafeMutableRawBufferPointer) throws -> Int,
                       write: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        try submitWhole(fill: { buffer in
            let n = try fill(buffer)
            return n > 0 ? n : nil
        }, write: write)
    }

    /// As `submit`, for a buffer used in parts: `fill` returns the bytes `write` needs
    /// from the start of the buffer (nil: queue nothing). `process`, when given, runs on a
    /// third thread between the two (in order too), so the caller fills the next buffer
    /// while the last one is processed and the one before it written.
    public func submitWhole(fill: (UnsafeMutableRawBufferPointer) throws -> Int?,
                            process: ((UnsafeMutableRawBufferPointer) throws -> Void)? = nil,
                            write: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        try submitExchanging(fill: { (try fill($0), nil) }, process: process, write: write)
    }

    /// As `submitWhole`, for a `fill` that may hand back a buffer of its own holding the bytes
    /// instead (`bufferSize` bytes, page aligned, from `UnsafeMutableRawBufferPointer.allocate`),
    /// having taken the one it was given: the pipeline goes on with that one and frees it.
    /// A `fill` that throws has taken nothing.
    public func submitExchanging(fill: (UnsafeMutableRawBufferPointer) throws
                                     -> (count: Int?, exchanged: UnsafeMutableRawBufferPointer?),
                                 process: ((UnsafeMutableRawBufferPointer) throws -> Void)? = nil,
                                 write: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        if let failure = firstFailure() { throw failure }
        freeCount.wait()
        lock.wait()
        let slot = free.removeLast()
        lock.signal()
        let filled: Int?
        do {
            let outcome = try fill(buffers[slot])
            if let exchanged = outcome.exchanged {
                precondition(exchanged.count == bufferSize, "an exchanged buffer of another size")
                buffers[slot] = exchanged
            }
            filled = outcome.count
        } catch {
            release(slot)
            throw error
        }
        guard let n = filled else {
            release(slot)
            return
        }
        let job = Unchecked(value: (write, UnsafeRawBufferPointer(rebasing: buffers[slot][0..<n])))
        // Through the processor always, so every write stays in the order it was queued.
        let step = Unchecked(value: (process, buffers[slot]))
        processor.async { [self] in
            if let process = step.value.0 { run { try process(step.value.1) } }
            writer.async { [self] in
                run { try job.value.0(job.value.1) }
                release(slot)
            }
        }
    }

    /// Queues work that needs no buffer (a zero write, say), in order with the writes.
    public func submit(_ work: @escaping () throws -> Void) throws {
        if let failure = firstFailure() { throw failure }
        let job = Unchecked(value: work)
        // Behind whatever is still being processed, so it stays in order with the writes.
        processor.async { [self] in writer.async { [self] in run(job.value) } }
    }

    /// Waits until every queued write has run (on every path out of a copy loop, before
    /// its output is closed: `defer { pipeline.drain() }`).
    public func drain() {
        processor.sync {}
        writer.sync {}
    }

    /// Waits until every queued write has run; throws the first error one threw.
    public func finish() throws {
        processor.sync {}
        writer.sync {}
        if let failure = firstFailure() { throw failure }
    }

    private func run(_ work: () throws -> Void) {
        guard firstFailure() == nil else { return }
        do {
            try work()
        } catch {
            lock.wait()
            if failure == nil { failure = error }
            lock.signal()
        }
    }

    private func release(_ slot: Int) {
        lock.wait()
        free.append(slot)
        lock.signal()
        freeCount.signal()
    }
}
