fn main() {
    println!("sdbooth");
}
