import Crypto
import Dispatch
import QCowImage
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// Hashes a new layer's 4 MiB chunks from the bytes the copier writes, as it writes them, so
/// that the digest costs neither a read of the file nor a hash after the last write: at the
/// end only the chunks that were not written front to back in one pass (the header, the
/// metadata the write-back rewrites, the file's partial tail) are read and hashed.
///
/// The layer's device tells `Streams` (a `WriteObserver`) of every write with its bytes, of
/// every failed write and of every resize. A chunk is digested from a write only while its
/// writes arrive in order from its first byte, each starting where the one before ended;
/// the digest stands when the chunk's last byte is written. Any other write to the chunk
/// (before, during or after that) or a resize below its end voids it for good, and `finish`
/// reads and hashes it from the file instead, so the digest is that of the file's final
/// bytes whatever the order of the writes.
final class LayerHasher: @unchecked Sendable {
    private let device: FileDevice
    private let log: WriteLog
    private let streams: Streams
    static let chunk = BackupManifest.chunkSize

    /// The digests of the chunks written front to back (see the type's comment).
    final class Streams: WriteObserver, @unchecked Sendable {
        private struct State {
            /// Chunks whose last byte was written in order: their digests.
            var digests: [Int: String] = [:]
            /// Chunks written in order from their first byte up to `next` (bytes into the chunk).
            var open: [Int: (hasher: SHA256, next: Int)] = [:]
            /// Chunks written out of order or cut by a resize: hashed from the file at the end.
            var void = Set<Int>()
            /// Chunks whose stream a write is hashing into now (taken out of `open`).
            var busy = Set<Int>()
            /// The end of the file as the writes and resizes made it (at least).
            var end: UInt64
        }
        private let state: Mutex<State>
        let chunk: Int

        init(chunk: Int, size: UInt64) {
            self.chunk = chunk
            state = Mutex(State(end: size))
        }

        /// One piece of a write inside one chunk that continues (or starts) its stream.
        private struct Piece {
            var number: Int
            var bytes: Range<Int>
            var stream: (hasher: SHA256, next: Int)
        }

        /// Takes the streams the write continues out of `open` (voiding the chunks it breaks),
        /// hashes its bytes into them while the write runs (on another thread when there is
        /// enough to hash, so the hash adds no time to the writer's), then puts them back, or
        /// their digests when complete; a failed write voids every chunk it touched.
        func observe(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, during write: () throws -> Void) throws {
            guard !bytes.isEmpty else { return try write() }
            var pieces = state.withLock { s in
                s.end = max(s.end, offset + UInt64(bytes.count))
                var pieces: [Piece] = []
                var done = 0
                while done < bytes.count {
                    let at = offset + UInt64(done)
                    let number = Int(at / UInt64(chunk))
                    let into = Int(at % UInt64(chunk))
                    let n = min(chunk - into, bytes.count - done)
                    defer { done += n }
                    if s.void.contains(number) { continue }
                    if let open = s.open[number], open.next == into {
                        s.open[number] = nil
                        pieces.append(Piece(number: number, bytes: done..<(done + n), stream: open))
                    } else if into == 0, s.open[number] == nil, s.digests[number] == nil, !s.busy.contains(number) {
                        pieces.append(Piece(number: number, bytes: done..<(done + n), stream: (SHA256(), 0)))
                    } else {
                        Self.void(number, in: &s)
                        continue
                    }
                    s.busy.insert(number)
                }
                return pieces
            }
            do {
                if pieces.reduce(0, { $0 + $1.bytes.count }) >= Self.hashAside {
                    let aside = Aside(pieces, bytes)
                    let hashed = DispatchSemaphore(value: 0)
                    Self.hashQueue.async {
                        Self.hash(&aside.pieces, from: aside.bytes)
                        hashed.signal()
                    }
                    let wrote = Result { try write() }
                    hashed.wait()  // the bytes must outlive the hash, whatever the write did
                    try wrote.get()
                    pieces = aside.pieces
                } else {
                    try write()
                    Self.hash(&pieces, from: bytes)
                }
            } catch {
                state.withLock { s in
                    for piece in pieces { s.busy.remove(piece.number) }
                    let last = Int((offset + UInt64(bytes.count) - 1) / UInt64(chunk))
                    for number in Int(offset / UInt64(chunk))...last { Self.void(number, in: &s) }
                }
                throw error
            }
            state.withLock { s in
                for piece in pieces {
                    s.busy.remove(piece.number)
                    // Another write broke the chunk meanwhile.
                    if s.void.contains(piece.number) { continue }
                    if piece.stream.next == chunk {
                        s.digests[piece.number] = LayerDigest.hex(piece.stream.hasher.finalize())
                    } else {
                        s.open[piece.number] = piece.stream
                    }
                }
            }
        }

        private final class Aside: @unchecked Sendable {
            var pieces: [Piece]
            let bytes: UnsafeRawBufferPointer
            init(_ pieces: [Piece], _ bytes: UnsafeRawBufferPointer) {
                self.pieces = pieces
                self.bytes = bytes
            }
        }

        private static func hash(_ pieces: inout [Piece], from bytes: UnsafeRawBufferPointer) {
            for i in pieces.indices {
                pieces[i].stream.hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: bytes[pieces[i].bytes]))
                pieces[i].stream.next += pieces[i].bytes.count
            }
        }

        /// Writes with at least this many bytes to hash are hashed on `hashQueue` while they are made.
        static let hashAside = 256 << 10
        static let hashQueue = DispatchQueue(label: "qbackup.layer-hasher")

        func resized(to size: UInt64) {
            state.withLock { s in
                defer { s.end = size }
                // Growing adds zeros past the end, where no write went: every digest stands.
                guard size < s.end else { return }
                let from = Int(size / UInt64(chunk))
                for number in Set(s.digests.keys).union(s.open.keys).union(s.busy).union([from]) where number >= from {
                    Self.void(number, in: &s)
                }
            }
        }

        private static func void(_ number: Int, in s: inout State) {
            s.open[number] = nil
            s.digests[number] = nil
            s.void.insert(number)
        }

        /// The digests that stand now.
        var digests: [Int: String] { state.withLock { $0.digests } }
    }

    /// Starts hashing the writes to `layer`'s file (before the first write of the copy).
    convenience init(_ layer: QCowFile) throws {
        guard let device = layer.device as? FileDevice else {
            throw ChainError(.invalidArgument, "a layer is hashed as it is written only in a file", path: layer.filename)
        }
        try self.init(device: device)
    }

    init(device: FileDevice) throws {
        self.device = device
        streams = Streams(chunk: Self.chunk, size: try device.size())
        log = WriteLog(granularity: UInt64(Self.chunk), observer: streams)
        device.writeLog = log
    }

    /// Chunks digested from the writes as they went (for tests).
    var hashedNow: Int { streams.digests.count }
    /// Chunks digested from the writes that still stood at `finish` (for tests).
    private(set) var hashedBehind = 0
    /// Chunks `finish` read and hashed from the file.
    private(set) var hashedAtEnd = 0

    /// Hashes every chunk without a digest from the writes while `work` (the fsync of the final
    /// file) runs; returns the file's digest and identity after both.
    func finish(during work: () throws -> Void) throws -> (LayerDigest, BackupManifest.Identity) {
        hashedBehind = streams.digests.count
        _ = log.take()
        final class Outcome: @unchecked Sendable { var result: Result<[Int: String], Error> = .success([:]) }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async { [self] in
            outcome.result = Result { try hashMissing(have: [:]) }
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
        // Whatever `work` wrote (nothing, for an fsync) is hashed again.
        var fromFile = try outcome.result.get()
        for number in log.take().chunks { fromFile[number] = nil }
        fromFile = try hashMissing(have: fromFile)
        device.writeLog = nil
        let size = try device.size()
        let streamed = streams.digests
        let chunks = try (0..<LayerDigest.chunkCount(of: size)).map { c in
            guard let d = fromFile[c] ?? streamed[c] else { throw ChainError(.io, "the layer was not hashed", path: device.name) }
            return d
        }
        // The identity after the work (its last write) is the one to record, of the file at the path.
        let named = FileDevice(adopting: FileDescriptor(rawValue: try RepositoryFiles.openRegular(device.name, flags: O_RDONLY)),
                               name: device.name, writable: false)
        defer { named.close() }
        return (LayerDigest(chunks: chunks, sha256: LayerDigest.combine(chunks), size: size), try LayerDigest.identity(of: named))
    }

    /// Stops watching the writes without a digest (the copy failed; the file goes).
    func cancel() {
        device.writeLog = nil
    }

    /// `have` and the digests of the chunks of the file as it is now that have none there nor
    /// from the writes, read from the file (a digest from the writes of a whole chunk past
    /// the end, after a shrink, is void already; the last chunk, partial, was never whole).
    private func hashMissing(have: [Int: String]) throws -> [Int: String] {
        let size = try device.size()
        let count = LayerDigest.chunkCount(of: size)
        let streamed = streams.digests
        var have = have
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        for c in 0..<count where have[c] == nil && (streamed[c] == nil || UInt64(c + 1) * UInt64(Self.chunk) > size) {
            guard let digest = try Self.hash(c, of: device, size: size, buffer: &buffer) else {
                throw ChainError(.io, "the file changed size while it was hashed", path: device.name)
            }
            have[c] = digest
            hashedAtEnd += 1
        }
        return have
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
