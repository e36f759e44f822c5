// swift-tools-version: 6.0
// libFuzzer executables for qbackup's hostile-input targets. Not part of the
// normal build: scripts/fuzz.sh builds them with
//   -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library
// The entry functions live in the main package (Tests/FuzzTargets), so the
// normal test suite replays the regression inputs through the same code.
import PackageDescription

let package = Package(
    name: "QBackupFuzz",
    dependencies: [
        .package(name: "qbackup", path: ".."),
    ],
    targets: [
        .target(name: "CFuzzerDriver"),
        .executableTarget(name: "FuzzImage", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzBitmaps", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzWrite", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzManifest", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzRepair", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzRepository", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
        .executableTarget(name: "FuzzStream", dependencies: ["CFuzzerDriver", .product(name: "FuzzTargets", package: "qbackup")]),
    ],
    swiftLanguageModes: [.v6]
)
