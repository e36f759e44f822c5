import Crypto
import Dispatch
import QCowImage
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Hashes a new layer's 4 MiB chunks on another thread while the copier still writes the
/// file, so that the digest no longer costs a whole read and hash of the file after the
/// last write: at the end only the chunks written since they were hashed (the metadata the
/// write-back puts in place, the file's tail) are hashed again.
///
/// Every write and resize of the layer's device is noted in a `WriteLog` (once more after
/// it completes). The thread takes the log, forgets the digests of the chunks it lists,
/// then hashes a whole chunk that has none yet, far enough behind the end of the file that
/// the copier is done with it. A write that lands in a chunk after the take that preceded
/// its read shows up in the next take. `finish` stops the thread and hashes what is left,
/// so the digest is that of the file's final bytes whatever the thread managed.
final class LayerHasher: @unchecked Sendable {
    private let device: FileDevice
    private let log: WriteLog
    private struct State {
        var digests: [Int: String] = [:]
        var stop = false
    }
    private let state = Mutex(State())
    private let stopped = DispatchSemaphore(value: 0)
    static let chunk = BackupManifest.chunkSize
    /// Chunks that end within this of the end of the file are left to the copier for now.
    static let margin = UInt64(16 << 20)

    /// Starts hashing behind the writes to `layer`'s file (before the first write of the copy).
    init(_ layer: QCowFile) throws {
        guard let device = layer.device as? FileDevice else {
            throw ChainError(.invalidArgument, "a layer is hashed as it is written only in a file", path: layer.filename)
        }
        self.device = device
        log = WriteLog(granularity: UInt64(Self.chunk))
        device.writeLog = log
        DispatchQueue.global().async { [self] in
            run()
            stopped.signal()
        }
    }

    /// Chunks hashed by the thread that were still valid when it stopped (for tests).
    private(set) var hashedBehind = 0
    /// Chunks with a digest now (for tests).
    var hashedNow: Int { state.withLock { $0.digests.count } }
    /// Chunks `finish` hashed itself.
    private(set) var hashedAtEnd = 0

    private func run() {
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while !state.withLock({ $0.stop }) {
            forget(log.take())
            guard let size = try? device.size() else { return }
            let whole = Int((size - min(size, Self.margin)) / UInt64(Self.chunk))
            guard let next = state.withLock({ s in (0..<whole).first { s.digests[$0] == nil } }) else {
                usleep(5_000)
                continue
            }
            guard let digest = try? Self.hash(next, of: device, size: size, buffer: &buffer) else { return }
            state.withLock { $0.digests[next] = digest }
        }
    }

    private func forget(_ taken: (chunks: Set<Int>, smallestResize: UInt64?)) {
        state.withLock { s in
            for c in taken.chunks { s.digests[c] = nil }
            if let resize = taken.smallestResize {
                let from = Int(resize / UInt64(Self.chunk))
                s.digests = s.digests.filter { $0.key < from }
            }
        }
    }

    /// Stops the thread, then hashes every chunk without a valid digest while `work` (the
    /// fsync of the final file) runs; returns the file's digest and identity after both.
    func finish(during work: () throws -> Void) throws -> (LayerDigest, BackupManifest.Identity) {
        state.withLock { $0.stop = true }
        stopped.wait()
        hashedBehind = state.withLock { $0.digests.count }
        final class Outcome: @unchecked Sendable { var result: Result<Void, Error> = .success(()) }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async { [self] in
            outcome.result = Result { try hashMissing() }
            done.signal()
        }
        let failure: Error?
        do {
            try work()
            failure = nil
        } catch {
            failure = error
        }
        done.wait()
        if let failure { throw failure }
        try outcome.result.get()
        // Whatever `work` wrote (nothing, for an fsync) is hashed again.
        try hashMissing()
        device.writeLog = nil
        let size = try device.size()
        let chunks = try state.withLock { s in
            try (0..<LayerDigest.chunkCount(of: size)).map { c in
                guard let d = s.digests[c] else { throw ChainError(.io, "the layer was not hashed", path: device.name) }
                return d
            }
        }
        // The identity after the work (its last write) is the one to record, of the file at the path.
        let named = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(device.name, flags: O_RDONLY)),
                               name: device.name, writable: false)
        defer { named.close() }
        return (LayerDigest(chunks: chunks, sha256: LayerDigest.combine(chunks), size: size), try LayerDigest.identity(of: named))
    }

    /// Stops the thread without a digest (the copy failed; the file goes).
    func cancel() {
        state.withLock { $0.stop = true }
        stopped.wait()
        device.writeLog = nil
    }

    /// Hashes every chunk of the file as it is now that has no digest or was written since.
    private func hashMissing() throws {
        forget(log.take())
        let size = try device.size()
        let count = LayerDigest.chunkCount(of: size)
        // The last chunk may be partial and a digest past the end means nothing: both go.
        state.withLock { s in s.digests = s.digests.filter { $0.key < count && UInt64($0.key + 1) * UInt64(Self.chunk) <= size } }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        for c in 0..<count where state.withLock({ $0.digests[c] == nil }) {
            guard let digest = try Self.hash(c, of: device, size: size, buffer: &buffer) else {
                throw ChainError(.io, "the file changed size while it was hashed", path: device.name)
            }
            state.withLock { $0.digests[c] = digest }
            hashedAtEnd += 1
        }
    }

    /// The SHA-256 (hex) of chunk `number` of a file of `size` bytes, read 1 MiB at a time,
    /// or nil when fewer bytes read.
    private static func hash(_ number: Int, of device: FileDevice, size: UInt64, buffer: inout [UInt8]) throws -> String? {
        let start = UInt64(number) * UInt64(chunk)
        let expected = Int(min(UInt64(chunk), size - min(size, start)))
        var hasher = SHA256()
        var got = 0
        while got < expected {
            let want = min(buffer.count, expected - got)
            let n = try buffer.withUnsafeMutableBytes {
                try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want]), at: start + UInt64(got))
            }
            if n == 0 { return nil }
            buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            got += n
        }
        return LayerDigest.hex(hasher.finalize())
    }
}
