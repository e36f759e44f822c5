import Synchronization

/// The parts of a file written since the log was attached to its device, in chunks of
/// `granularity` bytes: a caller that keeps a digest per chunk (a backup layer's 4 MiB
/// chunks) re-hashes only these after changing the file in place.
public final class WriteLog: Sendable {
    public let granularity: UInt64
    /// Given the bytes of every write as it is made, and told of every resize: a layer's
    /// hasher digests the chunks the copier writes front to back.
    public let observer: (any WriteObserver)?
    private struct State {
        var chunks = Set<Int>()
        var smallestResize: UInt64?
    }
    private let state = Mutex(State())

    public init(granularity: UInt64, observer: (any WriteObserver)? = nil) {
        precondition(granularity > 0)
        self.granularity = granularity
        self.observer = observer
    }

    /// A write of `length` bytes at `offset` (recorded before it is issued: a write that
    /// fails midway may still have changed the file).
    func wrote(at offset: UInt64, length: Int) {
        guard length > 0 else { return }
        let first = Int(offset / granularity)
        let last = Int((offset + UInt64(length) - 1) / granularity)
        state.withLock { $0.chunks.formUnion(first...last) }
    }

    /// A resize to `size` bytes (what lies past it reads as zeros afterwards).
    func resized(to size: UInt64) {
        state.withLock { $0.smallestResize = min($0.smallestResize ?? size, size) }
        observer?.resized(to: size)
    }

    /// The chunks written and the smallest resize since the last `take` (or since the log was
    /// attached), and forgets them. A device notes each write again once it has completed, so a
    /// chunk read after a `take` that does not list it holds every write noted before that take.
    public func take() -> (chunks: Set<Int>, smallestResize: UInt64?) {
        state.withLock { s in
            defer { s = State() }
            return (s.chunks, s.smallestResize)
        }
    }

    /// The chunks of a file that had `oldSize` bytes and now has `newSize` whose bytes may
    /// differ: those written, and from the first chunk the size changes (or a resize reached) on.
    public func changedChunks(oldSize: UInt64, newSize: UInt64) -> Set<Int> {
        let (written, resize) = state.withLock { ($0.chunks, $0.smallestResize) }
        let count = Int((newSize + granularity - 1) / granularity)
        var changed = written.filter { $0 < count }
        var from = oldSize == newSize ? newSize : min(oldSize, newSize)
        if let resize { from = min(from, resize) }
        if from < newSize { changed.formUnion(Int(from / granularity)..<count) }
        return changed
    }
}

/// What a `WriteLog` tells of a device's writes as they happen (see `WriteLog.observer`).
public protocol WriteObserver: AnyObject, Sendable {
    /// A write of `bytes` at `offset`, which `write` makes: the observer calls it once and
    /// may read the bytes meanwhile, on another thread too (they stay valid until it
    /// returns). Throws what `write` throws.
    func observe(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, during write: () throws -> Void) throws
    /// The file was resized to `size` bytes.
    func resized(to size: UInt64)
}
