import BitmapStore
import Foundation
import QCowImage
import Testing
import TestSupport

/// Helpers shared by the interop tests: QEMU makes and dirties images, and is
/// asked for its view of each bitmap.
enum QemuOracle {
    /// One step of building an image with QEMU.
    enum Step: Sendable {
        case add(String, granularity: Int?)
        case disable(String)
        case enable(String)
        case merge(source: String, into: String)
        case clear(String)
        case writes(seed: UInt64, count: Int)
        case io([String])
    }

    /// Runs `steps` on `image` with qemu-img bitmap and qemu-io.
    static func run(_ steps: [Step], on image: String, size: UInt64) throws {
        for step in steps {
            switch step {
            case .add(let name, let granularity):
                if let granularity {
                    try Tools.qemuImg("bitmap", "--add", "-g", String(granularity), image, name)
                } else {
                    try Tools.qemuImg("bitmap", "--add", image, name)
                }
            case .disable(let name): try Tools.qemuImg("bitmap", "--disable", image, name)
            case .enable(let name): try Tools.qemuImg("bitmap", "--enable", image, name)
            case .clear(let name): try Tools.qemuImg("bitmap", "--clear", image, name)
            case .merge(let source, let target): try Tools.qemuImg("bitmap", "--merge", source, image, target)
            case .writes(let seed, let count):
                try Tools.qemuIO(image, format: "qcow2", scatteredWrites(seed: seed, count: count, size: size))
            case .io(let commands):
                try Tools.qemuIO(image, format: "qcow2", commands)
            }
        }
    }

    /// qemu-io commands writing, zeroing and discarding at scattered, unaligned offsets.
    static func scatteredWrites(seed: UInt64, count: Int, size: UInt64) -> [String] {
        var rng = SeededRandom(seed: seed)
        return (0..<count).map { _ in
            let length = UInt64.random(in: 1...(Bool.random(using: &rng) ? 3000 : 300_000), using: &rng)
            let offset = UInt64.random(in: 0...(size - length), using: &rng)
            switch Int.random(in: 0..<6, using: &rng) {
            case 0: return "write -z \(offset) \(length)"
            case 1: return "discard \(offset) \(length)"
            default: return "write -P \(Int.random(in: 1...255, using: &rng)) \(offset) \(length)"
            }
        }
    }

    /// Our extents of a bitmap, in the helper's type.
    static func ourMap(_ bitmap: DirtyBitmap) -> [QemuNBD.Extent] {
        bitmap.extents().map { QemuNBD.Extent(start: $0.start, length: $0.length, dirty: $0.dirty) }
    }

    /// `qemu-img info --output=json`'s bitmaps: name -> (granularity, flags).
    static func infoBitmaps(_ image: String) throws -> [String: (granularity: UInt64, flags: [String])] {
        let result = try Tools.qemuImg("info", "--output=json", "-U", image)
        let root = try JSONSerialization.jsonObject(with: result.stdoutData) as? [String: Any]
        let data = (root?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        var out: [String: (UInt64, [String])] = [:]
        for item in data?["bitmaps"] as? [[String: Any]] ?? [] {
            guard let name = item["name"] as? String, let g = (item["granularity"] as? NSNumber)?.uint64Value else { continue }
            out[name] = (g, item["flags"] as? [String] ?? [])
        }
        return out
    }

    /// Fails unless `qemu-img check` reports no errors and no leaks.
    static func expectClean(_ image: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try Tools.run("qemu-img", ["check", image])
        #expect(result.status == 0, "qemu-img check: \(result.stdout) \(result.stderr)", sourceLocation: sourceLocation)
    }

    /// Opens `image` read-only as a qcow2 file.
    static func open(_ image: String, writable: Bool = false) throws -> QCowFile {
        let opened = try openRetryingLock(image, format: .qcow2, writable: writable)
        guard let file = opened as? QCowFile else {
            opened.close()
            throw BitmapError(.invalidFormat, "not a qcow2 image", path: image)
        }
        return file
    }
}
