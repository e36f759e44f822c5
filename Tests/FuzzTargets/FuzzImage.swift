import QCowImage

/// Fuzz entry points: each takes untrusted bytes, runs a library entry point on
/// a memory device (no file system), and returns normally whatever the bytes
/// are. A trap, a sanitizer report, a hang or a runaway allocation is the bug.
///
/// The libFuzzer executables in `Fuzz/` call these, and `FuzzRegressionTests`
/// replays every file of `Fuzz/regressions/<target>/` through them in the
/// normal test suite.
public enum FuzzTargets {
    /// The targets by name, as `scripts/fuzz.sh TARGET` and the regression folders call them.
    public static let all: [String: @Sendable (UnsafeRawBufferPointer) -> Void] = [
        "image": image,
        "bitmaps": bitmaps,
        "write": write,
        "manifest": manifest,
        "repository": repository,
        "repair": repair,
        "stream": stream,
    ]

    /// Guest bytes read per input, at most: fuzzed virtual sizes reach 2^61.
    public static let maxReadBytes: UInt64 = 32 << 20
    /// Map extents walked per input, at most (a 2 MiB-cluster L2 table has 256 Ki entries).
    public static let maxExtents = 4096

    struct Enough: Error {}

    /// Opens an image from bytes and runs what a read-only command runs on it:
    /// header decode and validation (and re-encoding), info, map, a read of the
    /// allocated extents, and the checker.
    public static func image(_ data: UnsafeRawBufferPointer) {
        let device = MemoryDevice(name: "<fuzz>", bytes: Array(data))
        guard let file = try? ImageOpener.openQCow(on: device, files: MemoryFiles()) else { return }
        roundTripHeader(file)
        _ = ImageInfo(file)
        var extents = 0
        try? file.forEachMapExtent { _ in
            extents += 1
            if extents >= maxExtents { throw Enough() }
        }
        readAllocated(file)
        _ = try? QCowChecker.check(file)
    }

    /// A header that decoded and validated encodes and decodes back to itself
    /// (but for where the backing file name sits: the encoder places it, and an
    /// offset of 0 means "no backing file" whatever the length field says).
    static func roundTripHeader(_ file: QCowFile) {
        var header = file.header
        guard let bytes = try? header.encoded(limit: file.clusterSize) else { return }
        do {
            var again = try QCowHeader(decoding: bytes)
            header.backingFileOffset = 0
            again.backingFileOffset = 0
            header.backingFileSize = 0
            again.backingFileSize = 0
            expect(again == header, "header does not survive encode/decode: \(header) vs \(again)")
        } catch {
            fatalError("re-encoded header does not decode: \(error)")
        }
    }

    /// Reads every extent the map reports, through the same paths `flatten` and
    /// `compare` use, up to `maxReadBytes` of guest data and `maxExtents` extents.
    static func readAllocated(_ file: GuestImage) {
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var budget = maxReadBytes
        var extents = 0
        var offset: UInt64 = 0
        let size = file.virtualSize
        while offset < size && budget > 0 && extents < maxExtents {
            guard let status = try? file.blockStatus(at: offset, maxLength: min(UInt64(chunk), size - offset)) else {
                return
            }
            expect(status.length > 0 && status.start == offset, "block status made no progress at \(offset)")
            // Zero and unallocated extents: read their first bytes too, the reader must agree they are zero.
            let n = status.kind == .data ? Int(min(status.length, budget)) : Int(min(status.length, 4096))
            do {
                try buffer.withUnsafeMutableBytes { raw in
                    try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]), at: offset)
                }
            } catch {
                return
            }
            if status.kind != .data {
                expect(buffer[0..<n].allSatisfy { $0 == 0 }, "a \(status.kind) extent at \(offset) reads non-zero")
            }
            budget -= UInt64(min(UInt64(n), budget))
            extents += 1
            offset += status.length
        }
    }
}

/// A property every input must keep; the message survives -O (unlike `precondition`'s).
@inline(__always)
func expect(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError(message()) }
}
