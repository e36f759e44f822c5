import BitmapStore
import QCowImage

extension FuzzTargets {
    /// Bitmap directory entries looked at per input, at most.
    static let maxBitmaps = 16

    /// Reads the bitmaps of an image from bytes: the bitmaps extension, the
    /// directory and its entries, every bitmap table, and each bitmap's data
    /// as `bitmap list`, `bitmap dump` and `info` see them. The dump's extents
    /// must tile the disk in order, alternating clean and dirty.
    public static func bitmaps(_ data: UnsafeRawBufferPointer) {
        let device = MemoryDevice(name: "<fuzz>", bytes: Array(data))
        guard let file = try? ImageOpener.openQCow(on: device, files: MemoryFiles()) else { return }
        // The bitmap part of `check` reads what opening the catalog refuses, so it runs first.
        _ = try? BitmapCatalog.check(file)
        guard let catalog = try? BitmapCatalog(file: file) else { return }
        _ = catalog.info()
        _ = try? catalog.list()
        for entry in catalog.entries.prefix(maxBitmaps) {
            _ = catalog.inconsistency(of: entry)
            _ = try? catalog.table(of: entry)
            guard let dump = try? catalog.dump(entry.name) else { continue }
            var next: UInt64 = 0
            var previous: Bool?
            var count = 0
            for extent in dump.bitmap.extents() {
                expect(extent.start == next && extent.length > 0, "bitmap '\(entry.name)': extent \(extent) after \(next)")
                expect(previous != extent.dirty, "bitmap '\(entry.name)': two \(extent.dirty ? "dirty" : "clean") extents in a row at \(extent.start)")
                next = extent.end
                previous = extent.dirty
                count += 1
                if count >= maxExtents { break }
            }
            if count < maxExtents {
                expect(next == dump.bitmap.virtualSize, "bitmap '\(entry.name)': extents end at \(next), disk at \(dump.bitmap.virtualSize)")
            }
        }
        bitmapWrites(data)
    }

    /// What `backup` does to a source image's bitmaps, on a hostile image: clear
    /// an existing bitmap, add one, track a guest write in it, store it. Any
    /// step may refuse; a bitmap that was stored must show the write as dirty.
    static func bitmapWrites(_ data: UnsafeRawBufferPointer) {
        guard UInt64(data.count) <= 4 << 20 else { return }
        let device = MemoryDevice(name: "<fuzz>", bytes: Array(data))
        guard let file = try? ImageOpener.openQCow(on: device, writable: true, files: MemoryFiles()), file.virtualSize > 0,
              let catalog = try? BitmapCatalog(file: file)
        else { return }
        if let first = catalog.entries.first { _ = try? catalog.clear(first.name) }
        let name = "fuzz-\(catalog.entries.count)"
        guard (try? catalog.add(name, granularity: 65536)) != nil, (try? catalog.startTracking()) != nil else { return }
        let at = file.virtualSize / 2 & ~511
        let length = Int(min(4096, file.virtualSize - at))
        let written = (try? [UInt8](repeating: 0x5a, count: length).withUnsafeBytes { try file.write($0, at: at) }) != nil
        guard (try? catalog.stopTracking()) != nil, written,
              let again = try? BitmapCatalog(file: file), let bitmap = try? again.load(name)
        else { return }
        expect(bitmap.isDirty(at: at), "bitmap '\(name)' stored after a write at \(at) does not show it dirty")
        _ = try? QCowChecker.check(file)
    }
}
