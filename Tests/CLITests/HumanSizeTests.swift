import Foundation
import Testing
import TestSupport

/// Human sizes (`humanSize`, qbackup's one size formatter) against qemu-img info's on the same images.
@Suite struct HumanSizeTests {
    /// Sizes at every unit boundary: just below and at 1000 of a unit (where qemu-img moves to the
    /// next unit), just below and at 1024 of it, and a few plain values.
    static let sizes: [UInt64] = {
        var sizes: [UInt64] = [0, 512, 1536, 10 * 1024 + 512, 100 * 1024 + 512]
        for k in 0..<6 {
            let unit = UInt64(1) << (10 * k)
            // 1000 * unit - 512 is 999.5 (k = 1), 999.9995 (k = 2), ... of the unit.
            sizes += [1000 * unit - min(512, unit), 1000 * unit - min(4096, unit), 1000 * unit, 1024 * unit - 512, 1024 * unit,
                      1536 * unit]
        }
        return Array(Set(sizes.filter { $0 % 512 == 0 && $0 <= 1 << 60 })).sorted()
    }()

    static func virtualSizeLine(_ text: String) -> String {
        text.split(separator: "\n").first { $0.hasPrefix("virtual size:") }.map(String.init) ?? "(none in: \(text))"
    }

    @Test func infoPrintsSizesAsQemuImg() throws {
        let dir = TempDir()
        for size in Self.sizes {
            let path = dir.file("\(size).qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", path, String(size))
            let ours = try QBackupBinary.run(["info", path])
            #expect(ours.status == 0, "\(ours.stderr)")
            let line = Self.virtualSizeLine(ours.stdout)
            let theirs = Self.virtualSizeLine(try Tools.qemuImg("info", path).stdout)
            #expect(!line.contains("e+"), "size \(size): \(line)")
            if theirs.contains("e+03") {
                // qemu-img's %0.3g rounds 999.5..<1000 of a unit up to "1e+03 X"; we use the next unit.
                let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
                let theirUnit = units.firstIndex { theirs.contains("e+03 \($0) ") } ?? units.count - 1
                let next = Double(size) / Double(UInt64(1) << (10 * (theirUnit + 1)))
                let expected = "virtual size: \(String(format: "%.3g", next)) \(units[theirUnit + 1]) (\(size) bytes)"
                #expect(next < 1 && line == expected, "size \(size) (qemu-img: \(theirs))")
            } else {
                #expect(line == theirs, "size \(size)")
            }
            try FileManager.default.removeItem(atPath: path)
        }
    }

    /// The exact texts at a few boundaries, including one qemu-img prints as "1e+03 MiB".
    static let exact: [(UInt64, String)] = [
        (0, "0 B"), (512, "512 B"), (1 << 10, "1 KiB"), (10 * 1024 + 512, "10.5 KiB"), (512_000, "500 KiB"),
        (1000 << 10, "0.977 MiB"), ((1000 << 20) - 4096, "0.977 GiB"), (1000 << 20, "0.977 GiB"),
        (1023 << 30, "0.999 TiB"), (1536 << 30, "1.5 TiB"), (1 << 60, "1 EiB"),
    ]

    @Test(arguments: exact)
    func exactTexts(size: UInt64, text: String) throws {
        let dir = TempDir()
        let path = dir.file("img.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", path, String(size))
        let line = Self.virtualSizeLine(try QBackupBinary.run(["info", path]).stdout)
        #expect(line == "virtual size: \(text) (\(size) bytes)")
    }
}
